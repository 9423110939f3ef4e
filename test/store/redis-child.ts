// Child process for the Redis store's cross-process tests: a second machine, as far as the store can tell.
//   redis-child.ts claim URL PREFIX COUNT NAME       fires COUNT concurrent claims, prints the ids won as JSON
//   redis-child.ts watch URL PREFIX COUNT            watches actors: prints "ready", then one key per change;
//                                                    "ended" if the watch ends before COUNT changes
import { RedisStore } from '../../src/store/redis.ts';

const [mode, url, prefix, count, name] = process.argv.slice(2);
const n = Number(count);

if (mode === 'claim') {
  const store = await RedisStore.open({ url: url!, prefix: prefix! });
  const claims = await Promise.all(
    Array.from({ length: n }, (_, i) =>
      store.claimWorker({ runtime: 'gvisor' }, { space: 'default', name: `${name}-${i}` }),
    ),
  );
  process.stdout.write(JSON.stringify(claims.flatMap((w) => (w ? [w.id] : []))));
  await store.close();
} else if (mode === 'watch') {
  const store = await RedisStore.open({
    url: url!,
    prefix: prefix!,
    redis: { connectionName: 'torpor-watch-child' },
  });
  const controller = new AbortController();
  const stream = store.watch(['actor'], controller.signal);
  process.stdout.write('ready\n');
  let seen = 0;
  for await (const change of stream) {
    process.stdout.write(`${change.key}\n`);
    if (++seen === n) controller.abort();
  }
  if (seen < n) process.stdout.write('ended\n');
  await store.close();
} else {
  throw new Error(`unknown mode ${mode}`);
}
