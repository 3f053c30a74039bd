/*
 * A QEMU-side peer for -open-hook-fd written from the RFC's protocol text
 * alone (qemu-options.hx of patch 2/5), not from the testbed's code:
 *
 *   request: u32 message_size; u32 command = 1 (QEMU_OPEN); u32 flags;
 *            u32 mode; u16 filename_len; u8 filename[filename_len]
 *   reply:   u32 message_size = 12; u32 command = 1; s32 result
 *            result < 0 is -errno; result == 0 carries one fd (SCM_RIGHTS)
 *
 * usage: rfc_peer SOCKET_FD PATH FLAGS MODE
 * prints "fd <n> <first bytes>" or "errno <n>", exit 0; exit 1 on a
 * protocol error.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s SOCKET_FD PATH FLAGS MODE\n", argv[0]);
        return 2;
    }
    int sock = atoi(argv[1]);
    const char *path = argv[2];
    uint32_t flags = (uint32_t)strtoul(argv[3], NULL, 0);
    uint32_t mode = (uint32_t)strtoul(argv[4], NULL, 0);
    uint16_t len = (uint16_t)strlen(path);

    unsigned char msg[18 + 4096];
    uint32_t size = 18 + len, cmd = 1;
    memcpy(msg, &size, 4);
    memcpy(msg + 4, &cmd, 4);
    memcpy(msg + 8, &flags, 4);
    memcpy(msg + 12, &mode, 4);
    memcpy(msg + 16, &len, 2);
    memcpy(msg + 18, path, len);
    if (write(sock, msg, size) != (ssize_t)size) {
        perror("write");
        return 1;
    }

    int32_t reply[3];
    char cbuf[CMSG_SPACE(sizeof(int) * 4)];
    struct iovec iov = { .iov_base = reply, .iov_len = sizeof(reply) };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
    ssize_t got = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    if (got != 12 || reply[0] != 12 || reply[1] != 1) {
        fprintf(stderr, "bad reply (%zd bytes)\n", got);
        return 1;
    }
    int fd = -1, nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            nfds += (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            memcpy(&fd, CMSG_DATA(c), sizeof(int));
        }
    }
    if (reply[2] < 0) {
        printf("errno %d\n", -reply[2]);
        return nfds == 0 ? 0 : 1;
    }
    if (nfds != 1) {
        fprintf(stderr, "result 0 with %d fds\n", nfds);
        return 1;
    }
    char buf[16] = { 0 };
    ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
    printf("fd %d %s\n", fd, n > 0 ? buf : "");
    return 0;
}
