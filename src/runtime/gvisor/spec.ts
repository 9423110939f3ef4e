// The OCI runtime spec for one activation. Kept pure so it can be tested without runsc.
import type { ActivationSpec } from '../runtime.ts';

const DEFAULT_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

// The capability set runc/runsc give a default container.
const CAPABILITIES = [
  'CAP_CHOWN',
  'CAP_DAC_OVERRIDE',
  'CAP_FSETID',
  'CAP_FOWNER',
  'CAP_MKNOD',
  'CAP_NET_RAW',
  'CAP_SETGID',
  'CAP_SETUID',
  'CAP_SETFCAP',
  'CAP_SETPCAP',
  'CAP_NET_BIND_SERVICE',
  'CAP_SYS_CHROOT',
  'CAP_KILL',
  'CAP_AUDIT_WRITE',
];

/** Image env first, then the template's env overriding by name. */
export function mergeEnv(imageEnv: string[], templateEnv: Record<string, string>): string[] {
  const merged = new Map<string, string>();
  for (const entry of [DEFAULT_PATH, ...imageEnv]) {
    const eq = entry.indexOf('=');
    if (eq > 0) merged.set(entry.slice(0, eq), entry.slice(eq + 1));
  }
  for (const [k, v] of Object.entries(templateEnv)) merged.set(k, v);
  return [...merged].map(([k, v]) => `${k}=${v}`);
}

/** The template's command replaces the image's entrypoint+cmd; an empty one keeps the image's. */
export function processArgs(spec: ActivationSpec): string[] {
  const args = spec.command.length > 0 ? spec.command : [...spec.image.entrypoint, ...spec.image.cmd];
  if (args.length === 0) throw new Error('image has no entrypoint or cmd and the template has no command');
  return args;
}

/** gVisor's own kernel lives inside the sandbox's memory cgroup with the actor. The template's memoryMiB is the
 * actor's budget; the sandbox gets this much more, or the kernel is OOM-killed while it serialises a checkpoint
 * (seen with ~12,000 closed connections in TIME_WAIT and a 256 MiB limit). */
export const SANDBOX_OVERHEAD_MIB = 256;

export function buildOciSpec(spec: ActivationSpec, identityDir: string): object {
  return {
    ociVersion: '1.0.0',
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: processArgs(spec),
      env: mergeEnv(spec.image.env, spec.env),
      cwd: spec.image.workingDir || '/',
      capabilities: {
        bounding: CAPABILITIES,
        effective: CAPABILITIES,
        permitted: CAPABILITIES,
      },
      rlimits: [{ type: 'RLIMIT_NOFILE', hard: 1048576, soft: 1048576 }],
      noNewPrivileges: true,
    },
    root: { path: spec.rootfs, readonly: false },
    hostname: spec.id.slice(0, 63),
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc' },
      {
        destination: '/dev',
        type: 'tmpfs',
        source: 'tmpfs',
        options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'],
      },
      {
        destination: '/dev/pts',
        type: 'devpts',
        source: 'devpts',
        options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620'],
      },
      {
        destination: '/dev/shm',
        type: 'tmpfs',
        source: 'shm',
        options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'],
      },
      { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
      { destination: '/run/torpor', type: 'bind', source: identityDir, options: ['rbind', 'ro'] },
    ],
    linux: {
      resources: {
        memory: { limit: (spec.memoryMiB + SANDBOX_OVERHEAD_MIB) * 1024 * 1024 },
        cpu: { quota: spec.vcpus * 100_000, period: 100_000 },
      },
      namespaces: [
        { type: 'pid' },
        { type: 'ipc' },
        { type: 'uts' },
        { type: 'mount' },
        { type: 'network', path: spec.netnsPath },
      ],
    },
  };
}
