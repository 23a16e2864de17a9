/* The launcher that waits inside a prewarmed container (a static binary, mounted read-only
 * from the host at /titan/launcher: the plugin cannot change it, and the image needs
 * nothing of its own for it). It is C, not Python, because it is what every idle
 * prewarmed container holds: about 0.2 MiB where an interpreter held 5.
 *
 * It says it is ready, then blocks on stdin for exactly one run: a decimal length and a
 * newline, then that many bytes of NUL-separated fields (the per-run token, the argv's
 * length, the argv, the run's environment as KEY=VALUE; neither an argument nor an
 * environment string can hold a NUL). It forks, and the child execs the plugin exactly as
 * a cold container would (same argv, working directory, environment, /dev/null on stdin,
 * its own process group, first in line for the OOM killer). The launcher makes itself
 * non-dumpable (the plugin runs as the same user and must not read the token from /proc
 * or ptrace it) and a child subreaper. When the plugin exits, whatever it left running is
 * killed and reaped, as when a cold container stops. Only then does it write the closing
 * line, with the token, the exit status and whether the OOM killer struck, on stdout and
 * on stderr, so the worker knows both streams are complete without waiting for the
 * engine. SIGTERM (the timeout) is passed on to the plugin's process group; SIGINT,
 * SIGQUIT, SIGHUP and SIGPIPE are ignored (the plugin starts with them as usual).
 *
 * Started with `--zygote INTERPRETER` (a Python entrypoint), it first starts the plugin's
 * interpreter (workers/zygote.py) the same way, before it has read anything of a run, and
 * says it is ready once that interpreter has imported what it preloads; the run's argv
 * and environment then go to that interpreter instead of to exec. An entrypoint that is
 * not the one it was started for is exec'd as usual, and the interpreter is killed unused.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/select.h>
#include <sys/wait.h>
#include <unistd.h>

#define READY "\0TITAN-READY\n"
#define LINGER_S 30 /* after the closing line, at most (a worker that died removes nothing) */
#define ZYGOTE "/titan/zygote.py"
#define MAX_REQUEST (8 << 20)

extern char **environ;
static const int IGNORED[] = {SIGINT, SIGQUIT, SIGHUP, SIGPIPE};
static volatile pid_t child = 0; /* the plugin, once it runs: SIGTERM goes to its group */

static void write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        data += n;
        len -= (size_t)n;
    }
}

static void on_term_exit(int sig) { (void)sig; _exit(143); }

static void on_term_forward(int sig) {
    (void)sig;
    if (child > 0) kill(-child, SIGTERM);
}

static void handle(int sig, void (*fn)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

/* The cgroup's OOM-kill count (cgroup v2 memory.events, or v1 memory.oom_control). */
static long oom_kills(void) {
    static const char *paths[] = {"/sys/fs/cgroup/memory.events",
                                  "/sys/fs/cgroup/memory/memory.oom_control"};
    for (size_t i = 0; i < 2; i++) {
        FILE *fh = fopen(paths[i], "re");
        if (!fh) continue;
        char name[64];
        long value;
        while (fscanf(fh, "%63s %ld", name, &value) == 2) {
            if (strcmp(name, "oom_kill") == 0) {
                fclose(fh);
                return value;
            }
        }
        fclose(fh);
    }
    return 0;
}

/* Forks the plugin's process and execs `argv` in it, as a container's first process
 * would be: its own process group, first for the OOM killer, /dev/null on stdin,
 * default signal handling. `fds` (read end, write end; -1: none) become its fds 3, 4. */
static pid_t start(char **argv, char **env, const int fds[2]) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    const char *step = "setting up";
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0); /* its own /proc files are its own again */
    if (setpgid(0, 0) < 0) goto failed;
    int adj = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (adj < 0 || write(adj, "1000", 4) != 4) goto failed;
    close(adj);
    int null = open("/dev/null", O_RDONLY);
    if (null < 0 || dup2(null, 0) < 0) goto failed;
    if (null != 0) close(null);
    if (fds && fds[0] >= 0) {
        int moved[2];
        for (int i = 0; i < 2; i++)
            if ((moved[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 10)) < 0) goto failed;
        for (int i = 0; i < 2; i++) /* inheritable, unlike the pipe's own ends */
            if (dup2(moved[i], 3 + i) < 0) goto failed;
    }
    signal(SIGTERM, SIG_DFL);
    for (size_t i = 0; i < sizeof IGNORED / sizeof *IGNORED; i++) signal(IGNORED[i], SIG_DFL);
    step = argv[0];
    execvpe(argv[0], argv, env);
failed:;
    const char *why = strerror(errno);
    write_all(2, step, strlen(step));
    write_all(2, ": ", 2);
    write_all(2, why, strlen(why));
    write_all(2, "\n", 1);
    _exit(127);
}

/* Waits for the plugin, kills what it left behind, reaps everything; returns the
 * plugin's exit status as a container would report it. */
static int wait_all(pid_t plugin) {
    int status = -1, raw;
    for (;;) {
        pid_t pid = waitpid(-1, &raw, 0);
        if (pid < 0) {
            if (errno == EINTR) continue;
            break; /* ECHILD */
        }
        if (pid == plugin) {
            status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
            break;
        }
    }
    kill(-1, SIGKILL); /* every process but this one (PID 1) and its parents */
    while (waitpid(-1, &raw, 0) >= 0 || errno == EINTR) {}
    return status < 0 ? 1 : status;
}

/* Reads exactly `len` bytes; 0 when the stream ends first. */
static int read_exact(int fd, char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = read(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;
        buf += n;
        len -= (size_t)n;
    }
    return 1;
}

/* The run's request: its NUL-separated fields, or NULL when stdin ended first. */
static char **read_request(size_t *count) {
    char header[24];
    size_t used = 0;
    for (;;) { /* the length, up to its newline */
        if (used == sizeof header - 1 || !read_exact(0, header + used, 1)) return NULL;
        if (header[used] == '\n') break;
        if (header[used] < '0' || header[used] > '9') return NULL;
        used++;
    }
    header[used] = '\0';
    size_t len = strtoul(header, NULL, 10);
    if (used == 0 || len == 0 || len > MAX_REQUEST) return NULL;
    char *data = malloc(len + 1);
    if (!data || !read_exact(0, data, len)) return NULL;
    data[len] = '\0';
    size_t n = 1;
    for (size_t i = 0; i < len; i++) n += data[i] == '\0';
    char **fields = calloc(n + 1, sizeof *fields);
    if (!fields) return NULL;
    fields[0] = data;
    for (size_t i = 0, k = 1; i < len; i++)
        if (data[i] == '\0') fields[k++] = data + i + 1;
    *count = n;
    return fields;
}

/* The container's environment with the run's on top (the run's wins). */
static char **merged(char **run_env, size_t run_count) {
    size_t base = 0;
    while (environ[base]) base++;
    char **env = calloc(base + run_count + 1, sizeof *env);
    size_t k = 0;
    for (size_t i = 0; i < base; i++) {
        size_t key = strcspn(environ[i], "=");
        int shadowed = 0;
        for (size_t j = 0; j < run_count && !shadowed; j++)
            shadowed = strncmp(run_env[j], environ[i], key + 1) == 0;
        if (!shadowed) env[k++] = environ[i];
    }
    for (size_t j = 0; j < run_count; j++) env[k++] = run_env[j];
    return env;
}

struct zygote {
    pid_t pid;
    int request;
    const char *interpreter;
};

/* The plugin's interpreter, started ahead (workers/zygote.py); pid 0 if it is not ready. */
static struct zygote start_zygote(const char *interpreter, int net) {
    struct zygote z = {0, -1, interpreter};
    int request[2], ready[2];
    if (pipe2(request, O_CLOEXEC) < 0) return z;
    if (pipe2(ready, O_CLOEXEC) < 0) {
        close(request[0]);
        close(request[1]);
        return z;
    }
    char *argv[] = {(char *)interpreter, ZYGOTE, net ? "--net" : NULL, NULL};
    int fds[2] = {request[0], ready[1]};
    z.pid = start(argv, environ, fds);
    close(request[0]);
    close(ready[1]);
    z.request = request[1];
    char said = 0;
    ssize_t n;
    while ((n = read(ready[0], &said, 1)) < 0 && errno == EINTR) {}
    close(ready[0]);
    if (z.pid < 0 || n != 1 || said != 'R') { /* it has preloaded, or it is gone */
        if (z.pid > 0) kill(-z.pid, SIGKILL);
        close(z.request);
        z.pid = 0;
    }
    return z;
}

/* Sends the run to the interpreter: NUL-separated, the argv's length first. */
static void hand(struct zygote *z, char **fields, size_t count) {
    for (size_t i = 1; i < count; i++) { /* fields[0] is the token: never the plugin's */
        write_all(z->request, fields[i], strlen(fields[i]));
        if (i + 1 < count) write_all(z->request, "", 1);
    }
    close(z->request);
}

int main(int argc, char **argv) {
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    /* PID 1 ignores signals it has no handler for: a stop before the run ends it at once. */
    handle(SIGTERM, on_term_exit);
    for (size_t i = 0; i < sizeof IGNORED / sizeof *IGNORED; i++) signal(IGNORED[i], SIG_IGN);
    struct zygote z = {0, -1, NULL};
    if (argc >= 3 && strcmp(argv[1], "--zygote") == 0)
        z = start_zygote(argv[2], argc >= 4 && strcmp(argv[3], "--net") == 0);
    write_all(1, READY, sizeof READY - 1);
    size_t count = 0;
    char **fields = read_request(&count);
    if (!fields) return 0;
    size_t argn = count >= 2 ? strtoul(fields[1], NULL, 10) : 0;
    if (count < 2 || argn == 0 || argn > count - 2) return 2; /* not a request of ours */
    const char *token = fields[0];
    char **run_argv = fields + 2, **run_env = fields + 2 + argn;
    size_t env_count = count - 2 - argn;
    /* The worker knows from this line that the run is taken: a container that ends
     * before it (killed, stopped) never started the plugin, and the run goes cold. */
    char line[128];
    int len = snprintf(line, sizeof line, "%cTITAN-GO:%s\n", 0, token);
    write_all(1, line, (size_t)len);
    long before = oom_kills();
    if (z.pid > 0 && strcmp(run_argv[0], z.interpreter) == 0) {
        hand(&z, fields, count);
        child = z.pid;
    } else {
        if (z.pid > 0) {
            close(z.request);
            kill(-z.pid, SIGKILL);
        }
        char **exec_argv = calloc(argn + 1, sizeof *exec_argv); /* NULL-terminated */
        memcpy(exec_argv, run_argv, argn * sizeof *exec_argv);
        child = start(exec_argv, merged(run_env, env_count), NULL);
    }
    handle(SIGTERM, on_term_forward);
    int code = wait_all(child);
    int oom = oom_kills() > before;
    len = snprintf(line, sizeof line, "%cTITAN-END:%s:%d:%d\n", 0, token, code, oom);
    write_all(1, line, (size_t)len);
    write_all(2, line, (size_t)len);
    /* Nothing of the run is left, but the container stays until the worker removes it:
     * its exit would set the engine tearing it down while the closing line is still on
     * its way out (measured: 2.4 ms later to the worker than any line before it). */
    handle(SIGTERM, on_term_exit);
    fd_set in;
    FD_ZERO(&in);
    FD_SET(0, &in);
    struct timeval linger = {LINGER_S, 0};
    select(1, &in, NULL, NULL, &linger);
    return 0;
}
