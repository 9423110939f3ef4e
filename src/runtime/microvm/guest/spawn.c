/* torpor-spawn: the guest init's static helper (it runs from the initramfs; no dependencies).
 *   torpor-spawn ROOT WORKDIR ENVFILE ARGVFILE
 *       starts a process inside the actor's root filesystem (busybox's chroot cannot set a working directory or a
 *       clean environment). ENVFILE and ARGVFILE hold one entry per line; the program is looked up on the PATH of
 *       ENVFILE, inside ROOT.
 *   torpor-spawn --stream SEQ SECONDS ROOT WORKDIR ENVFILE ARGVFILE
 *       runs the same as a command of the host's (exec) and streams its output to the control port (fd 3) as it
 *       comes: "SEQ out B64" and "SEQ err B64" lines, then "SEQ exit CODE - -". After SECONDS the command's
 *       process group is killed (SIGKILL: code 137). Output of background processes that outlive it is dropped.
 *   torpor-spawn --serve PORT ROOT STATEDIR
 *       serves the host's requests on the control port (the protocol is in init.sh's header): a process that runs
 *       from boot on answers a restored guest's first requests (resync) with a few system calls, where a shell
 *       loop paid, under TCG, a cold translation cache for the shell's own code and its fork and exec; the
 *       readiness answer shares the one vCPU with it. Reopens the port when the host side goes away. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

/* Decodes base64 ("-" = empty) into a fresh string; NULL when malformed. */
static char *unb64(const char *in) {
  size_t n = strlen(in);
  char *out = malloc(n / 4 * 3 + 4);
  if (!out) return NULL;
  size_t len = 0;
  if (strcmp(in, "-") == 0) n = 0;
  unsigned v = 0;
  int bits = 0;
  for (size_t i = 0; i < n && in[i] != '='; i++) {
    const char c = in[i];
    int d = c >= 'A' && c <= 'Z' ? c - 'A' : c >= 'a' && c <= 'z' ? c - 'a' + 26 : c >= '0' && c <= '9' ? c - '0' + 52
            : c == '+' ? 62 : c == '/' ? 63 : -1;
    if (d < 0) {
      free(out);
      return NULL;
    }
    v = v << 6 | (unsigned)d;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[len++] = (char)(v >> bits & 0xff);
    }
  }
  out[len] = 0;
  return out;
}

static int write_file(const char *path, const char *text) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return -1;
  write_all(fd, text, strlen(text));
  return close(fd);
}

/* Writes base64 field `b64` decoded into STATEDIR/name; the decoded text in *out when out is given. */
static int store_field(const char *dir, const char *name, const char *b64, char **out) {
  char path[512];
  char *text = unb64(b64);
  if (!text) return -1;
  snprintf(path, sizeof path, "%s/%s", dir, name);
  int rc = write_file(path, text);
  if (out) *out = text;
  else free(text);
  return rc;
}

static void answer(const char *seq, const char *text) {
  char line[512];
  int n = snprintf(line, sizeof line, "%s %s\n", seq, text);
  write_all(CONTROL_FD, line, n < (int)sizeof line ? (size_t)n : sizeof line - 1);
}

struct server {
  const char *root, *dir;
  char *workdir;
};

/* SEQ start ARGV ENV WORKDIR ACTORID: the workload starts in its own session, its output on the console; a
 * watcher (reparented to the init, which reaps it) says when it exits. */
static void serve_start(struct server *s, char **f) {
  char *wd = NULL;
  if (store_field(s->dir, "argv", f[2], NULL) || store_field(s->dir, "env", f[3], NULL) ||
      store_field(s->dir, "wd", f[4], &wd) || store_field("/run/ident", "actor-id", f[5], NULL)) {
    free(wd);
    answer(f[0], "err bad start request");
    return;
  }
  free(s->workdir);
  s->workdir = wd;
  pid_t watcher = fork();
  if (watcher == 0) {
    close(CONTROL_FD); /* the port admits one opener: nothing started from here may keep it */
    if (fork() != 0) _exit(0);
    int console = open("/dev/console", O_WRONLY), null = open("/dev/null", O_RDONLY);
    dup2(null, 0);
    dup2(console, 1);
    dup2(console, 2);
    char env[512], argv[512];
    snprintf(env, sizeof env, "%s/env", s->dir);
    snprintf(argv, sizeof argv, "%s/argv", s->dir);
    char *a[] = {(char *)s->root, s->workdir, env, argv, NULL};
    pid_t pid = fork();
    if (pid == 0) _exit(spawn(a));
    int status = 0;
    waitpid(pid, &status, 0);
    dprintf(2, "torpor-guest: workload exited with status %d\n",
            WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    _exit(0);
  }
  if (watcher > 0) waitpid(watcher, NULL, 0);
  answer(f[0], watcher > 0 ? "ok" : "err cannot start the workload");
}

static int set_clock(const char *seconds, const char *millis) {
  struct timespec ts = {.tv_sec = atoll(seconds), .tv_nsec = millis ? atol(millis) % 1000 * 1000000L : 0};
  return ts.tv_sec > 0 ? clock_settime(CLOCK_REALTIME, &ts) : -1;
}

/* SEQ resync UNIXSECONDS ACTORID [MILLISECONDS]: the clock stood still while the VM was suspended, and the actor
 * may be another one (a fork). The milliseconds are a later addition, which older guests ignore. */
static void serve_resync(char **f, int n) {
  if (set_clock(f[2], n > 4 ? f[4] : NULL) != 0) {
    answer(f[0], "err cannot set the clock");
    return;
  }
  answer(f[0], write_file("/run/ident/actor-id", f[3]) == 0 ? "ok" : "err cannot write the actor id");
}

/* SEQ clock UNIXSECONDS MILLISECONDS: the clock only, when the actor is the one the guest already names (rewriting
 * the id file costs a restored TCG guest ~35 ms of cold file system code before it answers anything else). */
static void serve_clock(char **f) {
  answer(f[0], set_clock(f[2], f[3]) == 0 ? "ok" : "err cannot set the clock");
}

/* SEQ exec ARGV TIMEOUTSECONDS: answered by its streamed output and exit line; the next request waits for it. */
static void serve_exec(struct server *s, char **f) {
  char env[512], argv[512];
  snprintf(env, sizeof env, "%s/env", s->dir);
  snprintf(argv, sizeof argv, "%s/exec.argv", s->dir);
  if (store_field(s->dir, "exec.argv", f[2], NULL) != 0) {
    answer(f[0], "err exec failed");
    return;
  }
  char *a[] = {f[0], f[3], (char *)s->root, s->workdir ? s->workdir : "/", env, argv, NULL};
  if (stream(a) != 0) answer(f[0], "err exec failed");
}

static void serve_line(struct server *s, char *line) {
  char *f[8];
  int n = 0;
  for (char *tok = strtok(line, " "); tok && n < 8; tok = strtok(NULL, " ")) f[n++] = tok;
  if (n < 2) return;
  if (strcmp(f[1], "ping") == 0) answer(f[0], "ok");
  else if (strcmp(f[1], "resync") == 0 && n >= 4) serve_resync(f, n);
  else if (strcmp(f[1], "clock") == 0 && n >= 4) serve_clock(f);
  else if (strcmp(f[1], "start") == 0 && n >= 6) serve_start(s, f);
  else if (strcmp(f[1], "exec") == 0 && n >= 4) serve_exec(s, f);
  else {
    char text[128];
    snprintf(text, sizeof text, "err unknown request %.64s", f[1]);
    answer(f[0], text);
  }
}

/* a: PORT ROOT STATEDIR. Lines up to 1 MiB (an exec's argv, a start's environment). */
static int serve(char **a) {
  struct server s = {.root = a[1], .dir = a[2], .workdir = NULL};
  static char buf[1 << 20];
  size_t have = 0;
  for (;;) {
    int fd = open(a[0], O_RDWR | O_NOCTTY);
    if (fd < 0) return 1;
    if (fd != CONTROL_FD) {
      dup2(fd, CONTROL_FD);
      close(fd);
    }
    for (;;) {
      ssize_t n = read(CONTROL_FD, buf + have, sizeof buf - 1 - have);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break; /* the host side went away: reopen once it is back */
      have += (size_t)n;
      char *start = buf, *nl;
      while ((nl = memchr(start, '\n', have - (size_t)(start - buf)))) {
        *nl = 0;
        serve_line(&s, start);
        start = nl + 1;
      }
      have -= (size_t)(start - buf);
      memmove(buf, start, have);
      if (have == sizeof buf - 1) have = 0; /* a line longer than the buffer is dropped */
    }
    close(CONTROL_FD);
    have = 0;
    usleep(20000);
  }
}

int main(int argc, char **argv) {
  if (argc == 8 && strcmp(argv[1], "--stream") == 0) return stream(argv + 2);
  if (argc == 5 && strcmp(argv[1], "--serve") == 0) return serve(argv + 2);
  if (argc == 5) return spawn(argv + 1);
  fprintf(stderr, "usage: torpor-spawn ROOT WORKDIR ENVFILE ARGVFILE | --stream SEQ SECONDS ROOT WORKDIR ENVFILE "
                  "ARGVFILE | --serve PORT ROOT STATEDIR\n");
  return 127;
}
