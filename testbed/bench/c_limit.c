/*
 * The kernel's limit for -open-hook-fd style fd passing, and two baselines.
 *
 * Compiled at bench time by testbed.bench.climit with the system cc.
 *
 *   c_limit MODE PATH SECONDS WARMUP CPU_BROKER CPU_CLIENT OUTFILE
 *
 * MODE
 *   pingpong  a forked "broker" and the client share a socketpair; per op the
 *             client sends a QEMU_OPEN request frame (DESIGN.md section 2), the
 *             broker opens PATH and answers with a 12-byte reply carrying the
 *             fd as SCM_RIGHTS, the client receives it and closes it.
 *   floor     open(PATH) + close() in the client itself: no passing at all.
 *   pidfd     a forked holder keeps PATH open; per op the client pulls a copy
 *             with pidfd_getfd(2) and closes it (the "pull" alternative).
 *
 * CPU_BROKER / CPU_CLIENT: a CPU number to pin to, or -1 to leave unpinned.
 * After WARMUP unrecorded ops, the client runs for SECONDS and writes each
 * op's latency in nanoseconds (native uint64) to OUTFILE.  One line on stdout:
 *   ops=N seconds=S broker_cpu_s=C
 * where C is the broker's (or holder's) user+system CPU time for all its ops,
 * warm-up included, and N counts only the recorded ops.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define QEMU_OPEN 1
#define REPLY_SIZE 12
#define MAX_FRAME (18 + 4096)

static void die(const char *what)
{
    fprintf(stderr, "c_limit: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void pin(int cpu, const char *who)
{
    cpu_set_t set;

    if (cpu < 0) {
        return;
    }
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0) {
        fprintf(stderr, "c_limit: pin %s to cpu %d: %s\n", who, cpu, strerror(errno));
        exit(1);
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int read_full(int fd, void *buf, size_t len)
{
    char *p = buf;

    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The broker side of pingpong: serve requests until the client hangs up. */
static void serve(int sock)
{
    unsigned char frame[MAX_FRAME + 1];
    uint32_t hdr[2], flags, mode, reply[3];
    uint16_t len;
    int fd;

    for (;;) {
        if (read_full(sock, hdr, sizeof(hdr)) < 0) {
            return;
        }
        if (hdr[0] < 18 || hdr[0] > MAX_FRAME || hdr[1] != QEMU_OPEN) {
            fprintf(stderr, "c_limit: bad request frame\n");
            exit(1);
        }
        if (read_full(sock, frame, hdr[0] - 8) < 0) {
            return;
        }
        memcpy(&flags, frame, 4);
        memcpy(&mode, frame + 4, 4);
        memcpy(&len, frame + 8, 2);
        if ((size_t)len + 18 != hdr[0]) {
            fprintf(stderr, "c_limit: filename_len disagrees with message_size\n");
            exit(1);
        }
        frame[10 + len] = '\0';
        fd = open((char *)frame + 10, (int)(flags & ~(uint32_t)O_CLOEXEC), (mode_t)mode);

        reply[0] = REPLY_SIZE;
        reply[1] = QEMU_OPEN;
        reply[2] = fd < 0 ? (uint32_t)-errno : 0;

        struct iovec iov = { .iov_base = reply, .iov_len = sizeof(reply) };
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } ctl;
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
        if (fd >= 0) {
            msg.msg_control = ctl.buf;
            msg.msg_controllen = sizeof(ctl.buf);
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(c), &fd, sizeof(int));
        }
        if (sendmsg(sock, &msg, 0) != (ssize_t)sizeof(reply)) {
            die("broker sendmsg");
        }
        if (fd >= 0) {
            close(fd);
        }
    }
}

/* One client op of pingpong; returns 0 or exits on any protocol failure. */
static void pingpong_op(int sock, const unsigned char *req, size_t req_len)
{
    int32_t reply[3];
    int fd;
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = { .iov_base = reply, .iov_len = sizeof(reply) };
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf),
    };

    if (write(sock, req, req_len) != (ssize_t)req_len) {
        die("client write");
    }
    if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != (ssize_t)sizeof(reply)) {
        die("client recvmsg");
    }
    if (reply[2] != 0) {
        errno = -reply[2];
        die("broker refused the open");
    }
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (c == NULL || c->cmsg_type != SCM_RIGHTS || (msg.msg_flags & MSG_CTRUNC)) {
        fprintf(stderr, "c_limit: reply without an fd\n");
        exit(1);
    }
    memcpy(&fd, CMSG_DATA(c), sizeof(int));
    close(fd);
}

static int pidfd_getfd_op(int pidfd, int target)
{
    int fd = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0);

    if (fd < 0) {
        die("pidfd_getfd");
    }
    return close(fd);
}

static void floor_op(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0) {
        die("open");
    }
    close(fd);
}

/* One operation of the chosen mode: 0 ping-pong, 1 floor, 2 pidfd_getfd. */
static void one_op(int which, int sock, const unsigned char *req, size_t req_len,
                   const char *path, int pidfd, int held)
{
    if (which == 0) {
        pingpong_op(sock, req, req_len);
    } else if (which == 1) {
        floor_op(path);
    } else {
        pidfd_getfd_op(pidfd, held);
    }
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr,
                "usage: c_limit pingpong|floor|pidfd PATH SECONDS WARMUP CPU_BROKER "
                "CPU_CLIENT OUTFILE\n");
        return 2;
    }
    const char *mode = argv[1], *path = argv[2];
    double seconds = atof(argv[3]);
    long warmup = atol(argv[4]);
    int cpu_broker = atoi(argv[5]), cpu_client = atoi(argv[6]);
    size_t path_len = strlen(path);

    if (path_len > 4096 || seconds <= 0 || seconds > 600 || warmup < 0) {
        fprintf(stderr, "c_limit: bad PATH length, SECONDS (0, 600] or WARMUP\n");
        return 2;
    }

    unsigned char req[MAX_FRAME];
    uint32_t u32;
    uint16_t u16 = (uint16_t)path_len;
    size_t req_len = 18 + path_len;
    u32 = (uint32_t)req_len;
    memcpy(req, &u32, 4);
    u32 = QEMU_OPEN;
    memcpy(req + 4, &u32, 4);
    u32 = O_RDONLY;
    memcpy(req + 8, &u32, 4);
    u32 = 0;
    memcpy(req + 12, &u32, 4);
    memcpy(req + 16, &u16, 2);
    memcpy(req + 18, path, path_len);

    int which;
    if (strcmp(mode, "pingpong") == 0) {
        which = 0;
    } else if (strcmp(mode, "floor") == 0) {
        which = 1;
    } else if (strcmp(mode, "pidfd") == 0) {
        which = 2;
    } else {
        fprintf(stderr, "c_limit: unknown mode %s\n", mode);
        return 2;
    }

    int sv[2] = { -1, -1 }, held = -1, pidfd = -1;
    pid_t child = -1;
    if (which == 0 && socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        die("socketpair");
    }
    if (which == 2) {
        held = open(path, O_RDONLY);
        if (held < 0 || pipe(sv) < 0) {
            die("open for pidfd");
        }
    }
    if (which != 1) {
        child = fork();
        if (child < 0) {
            die("fork");
        }
        if (child == 0) {
            pin(cpu_broker, "broker");
            if (which == 0) {
                close(sv[0]);
                serve(sv[1]);
            } else {
                /* the holder: keep `held` open until the client is done */
                char c;
                close(sv[1]);
                while (read(sv[0], &c, 1) < 0 && errno == EINTR) {
                }
            }
            _exit(0);
        }
        if (which == 0) {
            close(sv[1]);
        } else {
            close(sv[0]);
            pidfd = (int)syscall(SYS_pidfd_open, child, 0);
            if (pidfd < 0) {
                die("pidfd_open");
            }
        }
    }
    pin(cpu_client, "client");

    for (long i = 0; i < warmup; i++) {
        one_op(which, sv[0], req, req_len, path, pidfd, held);
    }

    size_t cap = 1 << 16, n = 0;
    uint64_t *lat = malloc(cap * sizeof(*lat));
    if (lat == NULL) {
        die("malloc");
    }
    uint64_t start = now_ns(), stop = start + (uint64_t)(seconds * 1e9), t0 = start, t1;
    do {
        one_op(which, sv[0], req, req_len, path, pidfd, held);
        t1 = now_ns();
        if (n == cap) {
            cap *= 2;
            lat = realloc(lat, cap * sizeof(*lat));
            if (lat == NULL) {
                die("realloc");
            }
        }
        lat[n++] = t1 - t0;
        t0 = t1;
    } while (t1 < stop);
    double elapsed = (double)(t1 - start) / 1e9;

    double broker_cpu = 0;
    if (child > 0) {
        int status;
        /* the broker sees EOF, the holder sees the pipe close */
        close(which == 0 ? sv[0] : sv[1]);
        if (waitpid(child, &status, 0) < 0) {
            die("waitpid");
        }
        struct rusage ru;
        getrusage(RUSAGE_CHILDREN, &ru);
        broker_cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                     (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    }

    FILE *out = fopen(argv[7], "wb");
    if (out == NULL || fwrite(lat, sizeof(*lat), n, out) != n || fclose(out) != 0) {
        die("write OUTFILE");
    }
    printf("ops=%zu seconds=%.6f broker_cpu_s=%.6f\n", n, elapsed, broker_cpu);
    return 0;
}
