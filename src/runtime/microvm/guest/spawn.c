/* torpor-spawn: the guest init's static helper (it runs from the initramfs; no dependencies).
 *   torpor-spawn ROOT WORKDIR ENVFILE ARGVFILE
 *       starts a process inside the actor's root filesystem (busybox's chroot cannot set a working directory or a
 *       clean environment). ENVFILE and ARGVFILE hold one entry per line; the program is looked up on the PATH of
 *       ENVFILE, inside ROOT.
 *   torpor-spawn --stream SEQ SECONDS ROOT WORKDIR ENVFILE ARGVFILE
 *       runs the same as a command of the host's (exec) and streams its output to the control port (fd 3) as it
 *       comes: "SEQ out B64" and "SEQ err B64" lines, then "SEQ exit CODE - -". After SECONDS the command's
 *       process group is killed (SIGKILL: code 137). Output of background processes that outlive it is dropped.
 *   torpor-spawn --clock REQUESTS ANSWERS
 *       serves clock resyncs after a restore, started once at boot: reads unix seconds, one per line, from the
 *       REQUESTS fifo, sets the clock and answers "ok" or "err" on the ANSWERS fifo. A process that already runs
 *       costs no fork and exec after a restore, which under TCG (a cold translation cache) take a few hundred ms. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ENTRIES 1024
#define CONTROL_FD 3

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

/* a: ROOT WORKDIR ENVFILE ARGVFILE. Returns only on failure (with the exit code to use). */
static int spawn(char **a) {
  static char *env[MAX_ENTRIES], *args[MAX_ENTRIES];
  if (read_lines(a[2], env, MAX_ENTRIES) < 0 || read_lines(a[3], args, MAX_ENTRIES) < 1) {
    fprintf(stderr, "torpor-spawn: cannot read %s or %s\n", a[2], a[3]);
    return 127;
  }
  setsid(); /* its own session: nothing of the init's reaches it */
  if (chroot(a[0]) != 0 || chdir("/") != 0) {
    perror("torpor-spawn: chroot");
    return 127;
  }
  if (a[1][0] && chdir(a[1]) != 0) {
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

static void write_all(int fd, const char *buf, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, buf, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    buf += w;
    n -= (size_t)w;
  }
}

#define CHUNK 3072 /* base64: 4096 characters, one line of one write */
static void put_chunk(const char *seq, const char *kind, const unsigned char *in, size_t n) {
  static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  char line[64 + CHUNK / 3 * 4 + 8];
  int len = snprintf(line, 64, "%s %s ", seq, kind);
  for (size_t i = 0; i < n; i += 3) {
    unsigned v = in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
    line[len++] = b64[v >> 18 & 63];
    line[len++] = b64[v >> 12 & 63];
    line[len++] = i + 1 < n ? b64[v >> 6 & 63] : '=';
    line[len++] = i + 2 < n ? b64[v & 63] : '=';
  }
  line[len++] = '\n';
  write_all(CONTROL_FD, line, (size_t)len);
}

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

/* a: SEQ SECONDS ROOT WORKDIR ENVFILE ARGVFILE */
static int stream(char **a) {
  const char *seq = a[0];
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) return 126;
  pid_t pid = fork();
  if (pid < 0) return 126;
  if (pid == 0) {
    int null = open("/dev/null", O_RDONLY);
    dup2(null, 0);
    dup2(out[1], 1);
    dup2(err[1], 2);
    close(CONTROL_FD); /* the port admits one opener: nothing started from here may keep it */
    _exit(spawn(a + 2));
  }
  close(out[1]);
  close(err[1]);
  long long deadline = now_ms() + atoll(a[1]) * 1000;
  struct pollfd fds[2] = {{.fd = out[0], .events = POLLIN}, {.fd = err[0], .events = POLLIN}};
  const char *kinds[2] = {"out", "err"};
  unsigned char buf[CHUNK];
  int status = 0, exited = 0, killed = 0;
  while (fds[0].fd >= 0 || fds[1].fd >= 0) {
    if (!exited && waitpid(pid, &status, WNOHANG) == pid) exited = 1;
    if (!exited && !killed && now_ms() >= deadline) {
      kill(-pid, SIGKILL);
      kill(pid, SIGKILL);
      killed = 1;
    }
    int ready = poll(fds, 2, exited ? 0 : 100);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0 && exited) break; /* drained: a background process may hold the pipes open */
    for (int i = 0; i < 2; i++) {
      if (fds[i].fd < 0 || !fds[i].revents) continue;
      ssize_t n = read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        put_chunk(seq, kinds[i], buf, (size_t)n);
      } else if (n == 0 || errno != EINTR) {
        close(fds[i].fd);
        fds[i].fd = -1;
      }
    }
  }
  if (!exited) waitpid(pid, &status, 0);
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  char line[64];
  write_all(CONTROL_FD, line, (size_t)snprintf(line, sizeof line, "%s exit %d - -\n", seq, code));
  return 0;
}

/* a: REQUESTS ANSWERS */
static int clock_server(char **a) {
  /* Both ends held open read-write: a writer that closes is no end-of-file, a reader need not wait for us. */
  int requests = open(a[0], O_RDWR), answers = open(a[1], O_RDWR);
  if (requests < 0 || answers < 0) return 1;
  FILE *in = fdopen(requests, "r");
  char line[64];
  while (fgets(line, sizeof line, in)) {
    struct timespec ts = {.tv_sec = atoll(line), .tv_nsec = 0};
    const char *answer = ts.tv_sec > 0 && clock_settime(CLOCK_REALTIME, &ts) == 0 ? "ok\n" : "err\n";
    write_all(answers, answer, strlen(answer));
  }
  return 1;
}

int main(int argc, char **argv) {
  if (argc == 8 && strcmp(argv[1], "--stream") == 0) return stream(argv + 2);
  if (argc == 4 && strcmp(argv[1], "--clock") == 0) return clock_server(argv + 2);
  if (argc == 5) return spawn(argv + 1);
  fprintf(stderr, "usage: torpor-spawn ROOT WORKDIR ENVFILE ARGVFILE | --stream SEQ SECONDS ROOT WORKDIR ENVFILE "
                  "ARGVFILE | --clock REQUESTS ANSWERS\n");
  return 127;
}
