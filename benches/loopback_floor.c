/* The floor of a WebSocket fanout on this machine: the kernel cost of one small loopback TCP
 * write per client per tick, with no WebSocket framing and no JSON (BENCHMARKS.md, "Fanout:
 * broadcast rings and one write per round").
 *
 * One process accepts N loopback connections and writes a MSGLEN-byte message, stamped with
 * its tick's time, to each of them, TICKS times per second for SECS seconds. A forked process
 * reads them with epoll and reports the delivery delay. Each side reports its CPU time per
 * write or read (getrusage). Each process holds N sockets: N must stay below `ulimit -n`.
 *
 *   gcc -O2 -Wall -o /tmp/loopback_floor benches/loopback_floor.c
 *   ulimit -n $(ulimit -Hn); /tmp/loopback_floor N TICKS SECS [MSGLEN]
 *   e.g. /tmp/loopback_floor 16000 2 6
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* CPU seconds of this process: user + system, or system only. */
static double cpu(int system_only) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    double sys = r.ru_stime.tv_sec + r.ru_stime.tv_usec * 1e-6;
    return system_only ? sys : sys + r.ru_utime.tv_sec + r.ru_utime.tv_usec * 1e-6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* Reads every connection until the run is over; prints the delay percentiles. */
static void reader(int n, double rate, int secs, int msglen, struct sockaddr_in *addr) {
    int ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0 || connect(s, (struct sockaddr *)addr, sizeof *addr)) die("connect");
        fcntl(s, F_SETFL, O_NONBLOCK);
        struct epoll_event e = {.events = EPOLLIN, .data.fd = s};
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &e);
    }
    size_t cap = (size_t)(n * rate * (secs + 2)) + 1000, got = 0;
    double *delay = malloc(cap * sizeof(double));
    long reads = 0;
    struct epoll_event ev[1024];
    static char buf[65536];
    double end = now() + secs + 3, c0 = cpu(0);
    while (now() < end) {
        int k = epoll_wait(ep, ev, 1024, 100);
        for (int i = 0; i < k; i++) {
            ssize_t r = read(ev[i].data.fd, buf, sizeof buf);
            if (r <= 0) continue;
            reads++;
            double t = now();
            for (ssize_t o = 0; o + msglen <= r; o += msglen) {
                double sent;
                memcpy(&sent, buf + o, sizeof sent);
                if (got < cap) delay[got++] = t - sent;
            }
        }
    }
    double used = cpu(0) - c0;
    if (got == 0) {
        printf("reader: nothing received\n");
        exit(1);
    }
    qsort(delay, got, sizeof(double), cmp);
    printf("reader: %zu messages in %ld reads, %.2f s CPU (%.2f us per read), delay p50 %.1f ms, p99 %.1f ms, max %.1f ms\n",
           got, reads, used, used / reads * 1e6, delay[got / 2] * 1e3, delay[got * 99 / 100] * 1e3,
           delay[got - 1] * 1e3);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s N TICKS SECS [MSGLEN]\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]), secs = atoi(argv[3]);
    double rate = atof(argv[2]);
    int msglen = argc > 4 ? atoi(argv[4]) : 150;
    if (n < 1 || rate <= 0 || secs < 1 || msglen < 8 || msglen > 4096) {
        fprintf(stderr, "N ≥ 1, TICKS > 0, SECS ≥ 1, 8 ≤ MSGLEN ≤ 4096\n");
        return 2;
    }
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) || listen(ls, 4096) ||
        getsockname(ls, (struct sockaddr *)&addr, &len))
        die("listen");
    pid_t pid = fork();
    if (pid == 0) {
        reader(n, rate, secs, msglen, &addr);
        return 0;
    }
    int *fds = malloc(n * sizeof(int));
    for (int i = 0; i < n; i++) {
        if ((fds[i] = accept(ls, 0, 0)) < 0) die("accept");
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
    }
    sleep(1);
    char msg[4096];
    memset(msg, 'x', sizeof msg);
    long writes = 0, short_writes = 0;
    double c0 = cpu(0), s0 = cpu(1), t0 = now(), next = t0;
    while (now() < t0 + secs) {
        double t;
        while ((t = now()) < next) {
            struct timespec ts = {0, (long)((next - t) * 1e9)};
            nanosleep(&ts, 0);
        }
        memcpy(msg, &next, sizeof next); /* the tick's scheduled time */
        for (int i = 0; i < n; i++) {
            if (write(fds[i], msg, msglen) == msglen) writes++;
            else short_writes++;
        }
        next += 1.0 / rate;
    }
    double used = cpu(0) - c0, sys = cpu(1) - s0;
    printf("writer: %ld writes (%ld short), %.2f s CPU of which %.2f s kernel (%.2f us per write), %.0f writes/s offered\n",
           writes, short_writes, used, sys, used / writes * 1e6, n * rate);
    int status;
    waitpid(pid, &status, 0);
    return 0;
}
