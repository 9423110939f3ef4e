/* torpor-spawn: starts a process inside the actor's root filesystem, as the guest init's helper (busybox's chroot
 * cannot set a working directory or a clean environment).
 *   torpor-spawn ROOT WORKDIR ENVFILE ARGVFILE
 * ENVFILE and ARGVFILE hold one entry per line. The program is looked up on the PATH of ENVFILE, inside ROOT.
 * Static, no dependencies: it runs from the initramfs. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_ENTRIES 1024

static int read_lines(const char *path, char **out, int cap) {
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  int n = 0;
  char *line = NULL;
  size_t len = 0;
  ssize_t got;
  while (n < cap - 1 && (got = getline(&line, &len, f)) >= 0) {
    if (got > 0 && line[got - 1] == '\n') line[got - 1] = 0;
    out[n++] = strdup(line);
  }
  out[n] = NULL;
  free(line);
  fclose(f);
  return n;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: torpor-spawn ROOT WORKDIR ENVFILE ARGVFILE\n");
    return 127;
  }
  static char *env[MAX_ENTRIES], *args[MAX_ENTRIES];
  if (read_lines(argv[3], env, MAX_ENTRIES) < 0 || read_lines(argv[4], args, MAX_ENTRIES) < 1) {
    fprintf(stderr, "torpor-spawn: cannot read %s or %s\n", argv[3], argv[4]);
    return 127;
  }
  setsid(); /* its own session: nothing of the init's reaches it */
  if (chroot(argv[1]) != 0 || chdir("/") != 0) {
    perror("torpor-spawn: chroot");
    return 127;
  }
  if (argv[2][0] && chdir(argv[2]) != 0) {
    perror("torpor-spawn: chdir");
    return 127;
  }
  /* execvpe searches the PATH of the calling process: take the workload's. */
  for (char **e = env; *e; e++)
    if (strncmp(*e, "PATH=", 5) == 0) setenv("PATH", *e + 5, 1);
  execvpe(args[0], args, env);
  fprintf(stderr, "torpor-spawn: %s: %s\n", args[0], strerror(errno));
  return errno == ENOENT ? 127 : 126;
}
