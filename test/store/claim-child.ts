// Child process for the cross-process claim test: opens the store file given as argv[2], fires argv[3]
// concurrent claims for actors named after argv[4], and prints the ids it won as JSON.
import { SqliteStore } from '../../src/store/sqlite.ts';

const [path, count, prefix] = process.argv.slice(2);
const store = SqliteStore.open(path!);
const claims = await Promise.all(
  Array.from({ length: Number(count) }, (_, i) =>
    store.claimWorker({ runtime: 'gvisor' }, { space: 'default', name: `${prefix}-${i}` }),
  ),
);
process.stdout.write(JSON.stringify(claims.flatMap((w) => (w ? [w.id] : []))));
await store.close();
