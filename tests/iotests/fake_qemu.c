/*
 * A stand-in for qemu-system in the hooked wrapper's tests: it prints its
 * argv[0] and every -L directory, then, when it got -open-hook-fd N, asks
 * the broker on fd N to open each remaining argument read-only (the
 * request as the RFC's protocol text gives it) and prints "open PATH fd"
 * or "open PATH errno E".  A real QEMU is too slow to start for a unit
 * test, and a script cannot show argv[0] (the kernel replaces it).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

static int ask(int sock, const char *path)
{
    unsigned char msg[18 + 4096];
    uint16_t len = (uint16_t)strlen(path);
    uint32_t size = 18 + len, cmd = 1, flags = 0, mode = 0;
    memcpy(msg, &size, 4);
    memcpy(msg + 4, &cmd, 4);
    memcpy(msg + 8, &flags, 4);
    memcpy(msg + 12, &mode, 4);
    memcpy(msg + 16, &len, 2);
    memcpy(msg + 18, path, len);
    if (write(sock, msg, size) != (ssize_t)size) {
        return -1;
    }
    unsigned char reply[12];
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = { reply, sizeof(reply) };
    struct msghdr mh = { 0 };
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof(cbuf);
    if (recvmsg(sock, &mh, 0) != sizeof(reply)) {
        return -1;
    }
    int32_t result;
    memcpy(&result, reply + 8, 4);
    if (result < 0) {
        printf("open %s errno %d\n", path, -result);
        return 0;
    }
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    if (c == NULL || c->cmsg_type != SCM_RIGHTS) {
        return -1;
    }
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof(int));
    close(fd);
    printf("open %s fd\n", path);
    return 0;
}

int main(int argc, char **argv)
{
    int sock = -1, i;
    printf("argv0 %s\n", argv[0]);
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-L") == 0 && i + 1 < argc) {
            printf("L %s\n", argv[++i]);
        } else if (strcmp(argv[i], "-open-hook-fd") == 0 && i + 1 < argc) {
            sock = atoi(argv[++i]);
        } else if (sock >= 0) {
            if (ask(sock, argv[i]) < 0) {
                printf("protocol error on %s\n", argv[i]);
                return 1;
            }
        } else {
            printf("arg %s\n", argv[i]);
        }
    }
    return 0;
}
