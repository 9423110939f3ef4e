#!/usr/bin/env node
// The `torpor` command. Sources are TypeScript run directly by Node's type stripping (Node >= 22.18).
import '../src/cli/main.ts';
