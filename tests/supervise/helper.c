/* A small program the supervisor tests run under the filter.
 *
 * Each sub-command does one thing a correctness point is about and prints
 * what it saw as "key=value" lines; the tests read them.  Built by
 * tests/supervise/conftest.py with gcc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static char *slurp(int fd) {
    static __thread char buf[4096];  /* per thread: the threads test reads at once */
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    buf[n < 0 ? 0 : n] = 0;
    return buf;
}

static void report_open(const char *key, int fd) {
    if (fd < 0)
        printf("%s=%s\n", key, strerrorname_np(errno));
    else
        printf("%s=ok\n", key);
}

/* relative A B: a thread with its own cwd A, the main thread in B; both open "name" */
static const char *thread_dir;
static char thread_seen[256];
static void *relative_thread(void *arg) {
    (void)arg;
    if (unshare(CLONE_FS) != 0 || chdir(thread_dir) != 0) {
        snprintf(thread_seen, sizeof thread_seen, "setup-failed");
        return NULL;
    }
    int fd = open("name", O_RDONLY);
    snprintf(thread_seen, sizeof thread_seen, "%s", fd < 0 ? strerrorname_np(errno) : slurp(fd));
    return NULL;
}

static int cmd_relative(char **argv) {
    if (chdir(argv[1]) != 0) return 2;
    thread_dir = argv[0];
    pthread_t t;
    pthread_create(&t, NULL, relative_thread, NULL);
    pthread_join(t, NULL);
    int fd = open("name", O_RDONLY);
    printf("thread=%s\n", thread_seen);
    printf("main=%s\n", fd < 0 ? strerrorname_np(errno) : slurp(fd));
    int dir = open(argv[0], O_RDONLY | O_DIRECTORY);
    int at = openat(dir, "name", O_RDONLY);
    printf("dirfd=%s\n", at < 0 ? strerrorname_np(errno) : slurp(at));
    return 0;
}

/* procself: /proc/self/status and /proc/thread-self/stat name the caller */
static void *procself_thread(void *arg) {
    (void)arg;
    int fd = open("/proc/thread-self/stat", O_RDONLY);
    printf("tid=%ld\n", (long)syscall(SYS_gettid));
    printf("thread_stat=%s\n", fd < 0 ? strerrorname_np(errno) : strtok(slurp(fd), " "));
    return NULL;
}

static int cmd_procself(void) {
    int fd = open("/proc/self/status", O_RDONLY);
    if (fd < 0) {
        printf("status=%s\n", strerrorname_np(errno));
        return 1;
    }
    char *pid = strstr(slurp(fd), "\nPid:");
    printf("pid=%d\n", getpid());
    printf("status_pid=%ld\n", pid ? strtol(pid + 5, NULL, 10) : -1L);
    pthread_t t;
    pthread_create(&t, NULL, procself_thread, NULL);
    pthread_join(t, NULL);
    return 0;
}

/* umask MASK PATH MODE: the created file's mode */
static int cmd_umask(char **argv) {
    umask(strtol(argv[0], NULL, 8));
    int fd = open(argv[1], O_CREAT | O_WRONLY | O_EXCL, strtol(argv[2], NULL, 8));
    report_open("open", fd);
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0) printf("mode=%o\n", st.st_mode & 07777);
    return 0;
}

/* cloexec PATH: FD_CLOEXEC as asked */
static int cmd_cloexec(char **argv) {
    int with = open(argv[0], O_RDONLY | O_CLOEXEC);
    int without = open(argv[0], O_RDONLY);
    printf("with=%d\n", with < 0 ? -1 : fcntl(with, F_GETFD) & FD_CLOEXEC);
    printf("without=%d\n", without < 0 ? -1 : fcntl(without, F_GETFD) & FD_CLOEXEC);
    return 0;
}

/* storm DIR N: N O_CREAT|O_EXCL opens under a 100 us SIGALRM storm */
static void on_alarm(int sig) { (void)sig; }
static int cmd_storm(char **argv) {
    struct sigaction sa = {.sa_handler = on_alarm, .sa_flags = SA_RESTART};
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 100}, {0, 100}};
    setitimer(ITIMER_REAL, &it, NULL);
    int n = atoi(argv[1]), eexist = 0, other = 0;
    char path[4096];
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%d", argv[0], i);
        int fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0600);
        if (fd >= 0)
            close(fd);
        else if (errno == EEXIST)
            eexist++;
        else
            other++;
    }
    struct itimerval off = {0};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("eexist=%d\nother=%d\n", eexist, other);
    return 0;
}

/* int80 PATH: an i386 open (number 5 is fstat on x86_64) */
static int cmd_int80(char **argv) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(5L), "b"(argv[0]), "c"(0L) : "memory");
    printf("survived=%ld\n", ret);
    return 0;
}

/* x32: openat with the x32 bit */
static int cmd_x32(char **argv) {
    long ret = syscall(0x40000000L | 257, AT_FDCWD, argv[0], O_RDONLY);
    printf("survived=%ld\n", ret);
    return 0;
}

/* iouring: io_uring_setup(1, params) */
static int cmd_iouring(void) {
    char params[120] = {0};
    long ret = syscall(425, 1, params);
    printf("io_uring_setup=%s\n", ret < 0 ? strerrorname_np(errno) : "ok");
    return 0;
}

/* handle PATH: name_to_handle_at is fine, open_by_handle_at is refused */
static int cmd_handle(char **argv) {
    struct file_handle *fh = malloc(sizeof *fh + MAX_HANDLE_SZ);
    fh->handle_bytes = MAX_HANDLE_SZ;
    int mount_id;
    if (name_to_handle_at(AT_FDCWD, argv[0], fh, &mount_id, 0) != 0) {
        printf("name_to_handle_at=%s\n", strerrorname_np(errno));
        return 1;
    }
    int fd = open_by_handle_at(AT_FDCWD, fh, O_RDONLY);
    report_open("open_by_handle_at", fd);
    return 0;
}

/* threads DIR N M: N threads, each opening DIR/tI M times and checking what it reads */
static const char *threads_dir;
static int threads_m;
static int threads_bad;
static pthread_mutex_t threads_lock = PTHREAD_MUTEX_INITIALIZER;
static void *threads_worker(void *arg) {
    long i = (long)arg;
    char path[4096], want[32];
    snprintf(path, sizeof path, "%s/t%ld", threads_dir, i);
    snprintf(want, sizeof want, "t%ld", i);
    for (int k = 0; k < threads_m; k++) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        char got[64] = "";
        if (fd >= 0) snprintf(got, sizeof got, "%s", slurp(fd));
        int bad = fd < 0 || strcmp(got, want) != 0;
        if (bad) printf("bad_%ld_%d=%s fd=%d got=%s\n", i, k, fd < 0 ? strerrorname_np(errno) : "-", fd, got);
        if (fd >= 0) close(fd);
        if (bad) {
            pthread_mutex_lock(&threads_lock);
            threads_bad++;
            pthread_mutex_unlock(&threads_lock);
        }
    }
    return NULL;
}

static int cmd_threads(char **argv) {
    threads_dir = argv[0];
    int n = atoi(argv[1]);
    threads_m = atoi(argv[2]);
    pthread_t t[256];
    for (long i = 0; i < n; i++) pthread_create(&t[i], NULL, threads_worker, (void *)i);
    for (int i = 0; i < n; i++) pthread_join(t[i], NULL);
    printf("bad=%d\n", threads_bad);
    return 0;
}

/* wait-open A B [FLAGS]: open A, wait for a line on stdin, open B (FLAGS, mode 0600), read A */
static int cmd_wait_open(char **argv) {
    int a = open(argv[0], O_RDONLY);
    report_open("a", a);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 2;
    int b = open(argv[1], argv[2] ? (int)strtol(argv[2], NULL, 0) : O_RDONLY, 0600);
    report_open("b", b);
    printf("a_reads=%s\n", a < 0 ? "-" : slurp(a));
    return 0;
}

/* emfile PATH: no free slot for the injected fd */
static int cmd_emfile(char **argv) {
    int lowest = dup(0);
    close(lowest);
    struct rlimit rl = {lowest, lowest};
    setrlimit(RLIMIT_NOFILE, &rl);
    int fd = open(argv[0], O_RDONLY);
    report_open("open", fd);
    return 0;
}

/* slow HUNG FAST N: a thread opens HUNG (which blocks); meanwhile N opens of FAST */
static const char *hung_path;
static void *hung_thread(void *arg) {
    (void)arg;
    int fd = open(hung_path, O_RDONLY);
    printf("hung=%s\n", fd < 0 ? strerrorname_np(errno) : "ok");
    fflush(stdout);
    return NULL;
}

static int cmd_slow(char **argv) {
    hung_path = argv[0];
    pthread_t t;
    pthread_create(&t, NULL, hung_thread, NULL);
    usleep(300000);
    int n = atoi(argv[2]), ok = 0;
    for (int i = 0; i < n; i++) {
        int fd = open(argv[1], O_RDONLY);
        if (fd >= 0) {
            ok++;
            close(fd);
        }
    }
    printf("fast_ok=%d\n", ok);
    fflush(stdout);
    pthread_join(t, NULL);
    return 0;
}

/* fds: every descriptor and what it is */
static int cmd_fds(void) {
    char link[64], target[4096];
    for (int fd = 0; fd < 1024; fd++) {
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n < 0) continue;
        target[n] = 0;
        printf("fd%d=%s\n", fd, target);
    }
    return 0;
}

/* write FD TEXT: write to an inherited descriptor */
static int cmd_write(char **argv) {
    ssize_t n = write(atoi(argv[0]), argv[1], strlen(argv[1]));
    printf("write=%s\n", n < 0 ? strerrorname_np(errno) : "ok");
    return 0;
}

/* open PATH FLAGS [MODE]: one open with numeric flags */
static int cmd_open(char **argv) {
    int fd = open(argv[0], (int)strtol(argv[1], NULL, 0), argv[2] ? strtol(argv[2], NULL, 8) : 0);
    report_open("open", fd);
    if (fd >= 0) printf("content=%s\n", slurp(fd));
    return 0;
}

/* edge DIR FILE MISSING: opens whose errno the kernel decides; the supervisor must answer alike */
struct how { unsigned long long flags, mode, resolve; };
static long openat2_(const char *path, unsigned long long flags, unsigned long long resolve) {
    struct how h = {flags, 0, resolve};
    return syscall(437, AT_FDCWD, path, &h, sizeof h);
}
static int cmd_edge(char **argv) {
    char longname[5000];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    int p[2];
    if (pipe(p) != 0) return 2;
    report_open("null", (int)syscall(SYS_open, NULL, O_RDONLY));
    report_open("badptr", (int)syscall(SYS_open, (const char *)1, O_RDONLY));
    report_open("empty", open("", O_RDONLY));
    report_open("badfd", openat(999, "x", O_RDONLY));
    report_open("notdir", openat(p[0], "x", O_RDONLY));
    report_open("long", open(longname, O_RDONLY));
    report_open("missing", open(argv[2], O_RDONLY));
    report_open("trailing_slash", open(strcat(strcpy(longname, argv[1]), "/"), O_RDONLY));
    report_open("openat2_plain", openat2_(argv[1], O_RDONLY, 0));
    report_open("openat2_badflags", openat2_(argv[1], 1ULL << 40, 0));
    report_open("opath", open(argv[1], O_PATH));
    report_open("tmpfile", open(argv[0], O_TMPFILE | O_RDWR, 0600));
    report_open("openat2_resolve", openat2_(argv[1], O_RDONLY, 0x08));
    return 0;
}

/* loop PATH N: N openat+close; prints the median ns of one */
static int cmp_long(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}
static int cmd_loop(char **argv) {
    int n = atoi(argv[1]);
    long *ns = malloc(sizeof(long) * n);
    for (int i = 0; i < n; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        int fd = openat(AT_FDCWD, argv[0], O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            printf("open=%s\n", strerrorname_np(errno));
            return 1;
        }
        close(fd);
        clock_gettime(CLOCK_MONOTONIC, &b);
        ns[i] = (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec);
    }
    qsort(ns, n, sizeof(long), cmp_long);
    printf("median_ns=%ld\n", ns[n / 2]);
    return 0;
}

/* ofdlock PATH N: open, take an OFD write lock, close, N times.  Each open
 * is a new open file description; once this process closed its fd, nothing
 * may still hold the description (and its lock), or the next lock fails. */
static int cmd_ofdlock(char **argv) {
    int n = atoi(argv[1]), conflicts = 0;
    for (int i = 0; i < n; i++) {
        int fd = open(argv[0], O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            printf("open=%s\n", strerrorname_np(errno));
            return 1;
        }
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 100, .l_len = 1};
        if (fcntl(fd, F_OFD_SETLK, &fl) != 0) conflicts++;
        close(fd);
    }
    printf("conflicts=%d\n", conflicts);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) return 2;
    const char *c = argv[1];
    char **a = argv + 2;
    if (!strcmp(c, "relative")) return cmd_relative(a);
    if (!strcmp(c, "procself")) return cmd_procself();
    if (!strcmp(c, "umask")) return cmd_umask(a);
    if (!strcmp(c, "cloexec")) return cmd_cloexec(a);
    if (!strcmp(c, "storm")) return cmd_storm(a);
    if (!strcmp(c, "int80")) return cmd_int80(a);
    if (!strcmp(c, "x32")) return cmd_x32(a);
    if (!strcmp(c, "iouring")) return cmd_iouring();
    if (!strcmp(c, "handle")) return cmd_handle(a);
    if (!strcmp(c, "threads")) return cmd_threads(a);
    if (!strcmp(c, "wait-open")) return cmd_wait_open(a);
    if (!strcmp(c, "emfile")) return cmd_emfile(a);
    if (!strcmp(c, "slow")) return cmd_slow(a);
    if (!strcmp(c, "fds")) return cmd_fds();
    if (!strcmp(c, "write")) return cmd_write(a);
    if (!strcmp(c, "open")) return cmd_open(a);
    if (!strcmp(c, "loop")) return cmd_loop(a);
    if (!strcmp(c, "edge")) return cmd_edge(a);
    if (!strcmp(c, "ofdlock")) return cmd_ofdlock(a);
    fprintf(stderr, "helper: unknown command %s\n", c);
    return 2;
}
