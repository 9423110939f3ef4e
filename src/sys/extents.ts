// The data extents of a sparse file (SEEK_DATA/SEEK_HOLE), so that a reader can skip its holes: a guest's memory
// file is mostly holes, and reading a hole still costs a copy of zeros (on ext4, page-cache pages too). Node's fs
// cannot seek to data; Perl (perl-base is essential in Debian) can.
import { run } from './run.ts';

/** A byte range [start, end) that may hold data; everything outside every extent reads as zeros. */
export interface Extent {
  start: number;
  end: number;
}

/** A Perl loop over the data extents of the file open as `$in`: `body` runs once per extent with `$data` (its
 * start) and `$hole` (its end) set, and `$size` the file's size. The one place that walks SEEK_DATA/SEEK_HOLE. */
export function perlExtentLoop(body: string): string {
  return `my ($size, $off) = (-s $in, 0);
while ($off < $size) {
  my $data = sysseek($in, $off, 3);  # SEEK_DATA; fails (ENXIO) when only a hole is left
  last unless defined $data;
  my $hole = sysseek($in, $data, 4) // $size;  # SEEK_HOLE
${body}
  $off = $hole;
}
`;
}

const PRINT_EXTENTS = `
use strict; use warnings;
open(my $in, '<:raw', $ARGV[0]) or die "open $ARGV[0]: $!\\n";
my $out = '';
${perlExtentLoop('  $out .= ($data + 0) . " " . ($hole + 0) . "\\n";  # + 0: sysseek to 0 returns "0 but true"')}
print "$size\\n$out";
`;

/** The data extents of `path`, sorted, and its size when they were listed. Where the file system cannot tell
 * holes apart, the whole file is one extent (SEEK_DATA then reports everything as data). */
export async function dataExtents(path: string): Promise<{ size: number; extents: Extent[] }> {
  const { stdout } = await run('perl', ['-e', PRINT_EXTENTS, path], { label: 'list data extents', timeoutMs: 30_000 });
  const [sizeLine, ...lines] = stdout.trim().split('\n');
  const size = Number(sizeLine);
  const extents = lines.map((line) => {
    const [start, end] = line.split(' ').map(Number) as [number, number];
    return { start, end: Math.min(end, size) };
  });
  if (!Number.isSafeInteger(size) || extents.some((e) => !(e.start >= 0 && e.end > e.start))) {
    throw new Error(`unexpected extent list for ${path}`);
  }
  return { size, extents };
}
