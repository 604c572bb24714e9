/* Load generator and target server for the proxyorch benchmarks (built at run time by loadgen.py).
 *
 *   loadgen serve  --echo-port P --source-port P          target: epoll echo + endless source
 *   loadgen bulk   [proxy] --port P --streams N --duration S --warmup S
 *   loadgen rate   [proxy] --port P --conns C --duration S --warmup S [--size 64]
 *   loadgen rtt    [proxy] --port P (--count N | --duration S) [--interval-ms I] [--size 64]
 *   loadgen idle   [proxy] --port P --count N                 hold N sessions until stdin closes
 *
 * [proxy] = --proxy PORT [--user U --pass P]: every session is a SOCKS5 session to 127.0.0.1:PORT
 * (greeting, RFC 1929 auth when --user is given, CONNECT to 127.0.0.1:--port), each step waiting
 * for its reply like a real client. Without --proxy the client connects to the target directly.
 * Results are one JSON object on stdout. Everything is on 127.0.0.1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int g_proxy_port = 0, g_port = 0, g_size = 64;
static const char *g_user = NULL, *g_pass = NULL;
static double g_duration = 2.0, g_warmup = 0.5, g_interval_ms = 0.0;
static int g_streams = 1, g_conns = 50, g_count = 0;
static volatile sig_atomic_t g_stop = 0;

static void on_stop(int sig) {
    (void)sig;
    g_stop = 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int read_full(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, (char *)buf + got, n - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n) {
    size_t sent = 0;
    while (sent < n) {
        ssize_t r = send(fd, (const char *)buf + sent, n - sent, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        sent += (size_t)r;
    }
    return 0;
}

static int tcp_connect(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* A session to 127.0.0.1:port, directly or through the SOCKS5 proxy. Returns fd or -1. */
static int open_session(int port) {
    if (!g_proxy_port) return tcp_connect(port);
    int fd = tcp_connect(g_proxy_port);
    if (fd < 0) return -1;
    unsigned char buf[600];
    unsigned char greet[3] = {5, 1, g_user ? 2 : 0};
    if (write_full(fd, greet, 3) || read_full(fd, buf, 2) || buf[0] != 5 || buf[1] != greet[2]) goto fail;
    if (g_user) {
        size_t ul = strlen(g_user), pl = strlen(g_pass), n = 0;
        buf[n++] = 1;
        buf[n++] = (unsigned char)ul;
        memcpy(buf + n, g_user, ul);
        n += ul;
        buf[n++] = (unsigned char)pl;
        memcpy(buf + n, g_pass, pl);
        n += pl;
        if (write_full(fd, buf, n) || read_full(fd, buf, 2) || buf[1] != 0) goto fail;
    }
    unsigned char req[10] = {5, 1, 0, 1, 127, 0, 0, 1, (unsigned char)(port >> 8), (unsigned char)port};
    if (write_full(fd, req, 10) || read_full(fd, buf, 4) || buf[1] != 0) goto fail;
    size_t rest;
    if (buf[3] == 1) rest = 4 + 2;
    else if (buf[3] == 4) rest = 16 + 2;
    else if (buf[3] == 3) {
        if (read_full(fd, buf, 1)) goto fail;
        rest = (size_t)buf[0] + 2;
    } else goto fail;
    if (read_full(fd, buf, rest)) goto fail;
    return fd;
fail:
    close(fd);
    return -1;
}

static int echo_once(int fd, unsigned char *out, unsigned char *in, int size) {
    if (write_full(fd, out, (size_t)size)) return -1;
    if (read_full(fd, in, (size_t)size)) return -1;
    return memcmp(out, in, (size_t)size) ? -1 : 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void print_latencies(double *v, size_t n) {
    if (n == 0) {
        printf("\"p50_us\": null, \"p90_us\": null, \"p99_us\": null, \"max_us\": null, \"mean_us\": null");
        return;
    }
    qsort(v, n, sizeof(double), cmp_double);
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += v[i];
#define PCT(p) (v[(size_t)((p) * (double)(n - 1) + 0.5)] * 1e6)
    printf("\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f, \"mean_us\": %.1f",
           PCT(0.50), PCT(0.90), PCT(0.99), v[n - 1] * 1e6, sum / (double)n * 1e6);
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* -- target server ---------------------------------------------------------------------------- */
#define KIND_ECHO_L 1
#define KIND_SOURCE_L 2
#define KIND_ECHO 3
#define KIND_SOURCE 4
static char g_src_buf[256 * 1024];

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 4096) < 0) {
        perror("listen");
        exit(2);
    }
    return fd;
}

static int serve(int echo_port, int source_port) {
    int ep = epoll_create1(0);
    int le = listen_on(echo_port), ls = listen_on(source_port);
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = ((uint64_t)KIND_ECHO_L << 32) | (uint32_t)le;
    epoll_ctl(ep, EPOLL_CTL_ADD, le, &ev);
    ev.data.u64 = ((uint64_t)KIND_SOURCE_L << 32) | (uint32_t)ls;
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("{\"ready\": true}\n");
    fflush(stdout);
    static char buf[65536];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0 && errno == EINTR) continue;
        for (int i = 0; i < n; i++) {
            int kind = (int)(evs[i].data.u64 >> 32), fd = (int)(uint32_t)evs[i].data.u64;
            if (kind == KIND_ECHO_L || kind == KIND_SOURCE_L) {
                for (;;) {
                    int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    int one = 1;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev;
                    cev.events = kind == KIND_ECHO_L ? EPOLLIN : (EPOLLIN | EPOLLOUT);
                    cev.data.u64 = ((uint64_t)(kind == KIND_ECHO_L ? KIND_ECHO : KIND_SOURCE) << 32) | (uint32_t)c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            int dead = (evs[i].events & (EPOLLERR | EPOLLHUP)) != 0;
            if (!dead && (evs[i].events & EPOLLIN)) {
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) dead = 1;
                else if (r > 0 && kind == KIND_ECHO) {
                    /* echo payloads are small; block briefly if the socket is full */
                    ssize_t off = 0;
                    while (off < r) {
                        ssize_t w = send(fd, buf + off, (size_t)(r - off), MSG_NOSIGNAL);
                        if (w > 0) off += w;
                        else if (w < 0 && (errno == EAGAIN || errno == EINTR)) usleep(100);
                        else { dead = 1; break; }
                    }
                }
            }
            if (!dead && kind == KIND_SOURCE && (evs[i].events & EPOLLOUT)) {
                for (int k = 0; k < 4; k++) {
                    ssize_t w = send(fd, g_src_buf, sizeof g_src_buf, MSG_NOSIGNAL);
                    if (w < 0) {
                        if (errno != EAGAIN && errno != EINTR) dead = 1;
                        break;
                    }
                }
            }
            if (dead) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
        }
    }
    return 0;
}

/* -- bulk ------------------------------------------------------------------------------------- */
typedef struct {
    double t_start, t_warm, t_end;
    long long bytes, all_bytes;
    int error;
    pthread_barrier_t *barrier;
} bulk_arg;

static void *bulk_thread(void *p) {
    bulk_arg *a = p;
    int fd = open_session(g_port);
    pthread_barrier_wait(a->barrier);
    if (fd < 0) {
        a->error = 1;
        return NULL;
    }
    struct timeval tv = {0, 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char *buf = malloc(256 * 1024);
    double t0 = now_s();
    double warm = t0 + g_warmup, end = warm + g_duration;
    a->t_warm = warm;
    for (;;) {
        ssize_t r = recv(fd, buf, 256 * 1024, 0);
        double t = now_s();
        if (r > 0) a->all_bytes += r;
        if (r > 0 && t >= warm) a->bytes += r;
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
            a->error = 1;
            break;
        }
        if (t >= end || g_stop) break;
    }
    a->t_end = now_s();
    free(buf);
    close(fd);
    return NULL;
}

static int run_bulk(void) {
    signal(SIGINT, on_stop); /* stop early (the report is still printed) */
    signal(SIGTERM, on_stop);
    pthread_t th[256];
    bulk_arg args[256];
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, (unsigned)g_streams);
    memset(args, 0, sizeof args);
    double cpu0 = cpu_seconds();
    for (int i = 0; i < g_streams; i++) {
        args[i].barrier = &barrier;
        pthread_create(&th[i], NULL, bulk_thread, &args[i]);
    }
    long long total = 0, all = 0;
    int errors = 0;
    double t_warm = 0, t_end = 0;
    for (int i = 0; i < g_streams; i++) {
        pthread_join(th[i], NULL);
        total += args[i].bytes;
        all += args[i].all_bytes;
        errors += args[i].error;
        if (args[i].t_warm > t_warm) t_warm = args[i].t_warm;
        if (args[i].t_end > t_end) t_end = args[i].t_end;
    }
    double secs = t_end > t_warm ? t_end - t_warm : g_duration;
    printf("{\"mode\": \"bulk\", \"streams\": %d, \"bytes\": %lld, \"seconds\": %.3f, \"MBps\": %.2f, "
           "\"errors\": %d, \"all_bytes\": %lld, \"loadgen_cpu_s\": %.3f}\n",
           g_streams, total, secs, total / secs / 1e6, errors, all, cpu_seconds() - cpu0);
    return 0;
}

/* -- session rate ------------------------------------------------------------------------------ */
typedef struct {
    double warm, end;
    double *lat;
    size_t n, cap;
    long long ok, errors;
} rate_arg;

static void *rate_thread(void *p) {
    rate_arg *a = p;
    unsigned char out[4096], in[4096];
    for (int i = 0; i < g_size; i++) out[i] = (unsigned char)(i * 7 + 1);
    for (;;) {
        double t0 = now_s();
        if (t0 >= a->end) break;
        int fd = open_session(g_port);
        int ok = fd >= 0 && echo_once(fd, out, in, g_size) == 0;
        if (fd >= 0) close(fd);
        double t1 = now_s();
        if (t0 < a->warm || t1 > a->end) continue;
        if (!ok) {
            a->errors++;
            usleep(1000);
            continue;
        }
        a->ok++;
        if (a->n == a->cap) {
            a->cap = a->cap ? a->cap * 2 : 4096;
            a->lat = realloc(a->lat, a->cap * sizeof(double));
        }
        a->lat[a->n++] = t1 - t0;
    }
    return NULL;
}

static int run_rate(void) {
    pthread_t *th = calloc((size_t)g_conns, sizeof(pthread_t));
    rate_arg *args = calloc((size_t)g_conns, sizeof(rate_arg));
    double start = now_s();
    double cpu0 = cpu_seconds();
    for (int i = 0; i < g_conns; i++) {
        args[i].warm = start + g_warmup;
        args[i].end = start + g_warmup + g_duration;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        if (pthread_create(&th[i], &attr, rate_thread, &args[i])) {
            perror("pthread_create");
            exit(1);
        }
    }
    size_t total = 0;
    long long ok = 0, errors = 0;
    for (int i = 0; i < g_conns; i++) {
        pthread_join(th[i], NULL);
        total += args[i].n;
        ok += args[i].ok;
        errors += args[i].errors;
    }
    double *all = malloc((total ? total : 1) * sizeof(double));
    size_t k = 0;
    for (int i = 0; i < g_conns; i++) {
        memcpy(all + k, args[i].lat, args[i].n * sizeof(double));
        k += args[i].n;
    }
    printf("{\"mode\": \"rate\", \"conns\": %d, \"sessions\": %lld, \"errors\": %lld, \"seconds\": %.3f, "
           "\"rate\": %.1f, \"loadgen_cpu_s\": %.3f, ",
           g_conns, ok, errors, g_duration, ok / g_duration, cpu_seconds() - cpu0);
    print_latencies(all, total);
    printf("}\n");
    return 0;
}

/* -- round trip on one established session ------------------------------------------------------ */
static int run_rtt(void) {
    double t_open = now_s();
    int fd = open_session(g_port);
    t_open = now_s() - t_open;
    if (fd < 0) {
        printf("{\"mode\": \"rtt\", \"error\": \"session failed\"}\n");
        return 1;
    }
    unsigned char out[4096], in[4096];
    for (int i = 0; i < g_size; i++) out[i] = (unsigned char)(i * 3 + 5);
    size_t cap = g_count > 0 ? (size_t)g_count : 1 << 16, n = 0;
    double *lat = malloc(cap * sizeof(double));
    double start = now_s(), end = start + g_duration;
    long long errors = 0;
    if (g_interval_ms <= 0)
        for (int i = 0; i < 3; i++) echo_once(fd, out, in, g_size); /* warm the path */
    for (;;) {
        if (g_count > 0 && n >= (size_t)g_count) break;
        /* duration mode: at least 5 samples, unless that takes 30 s more */
        if (g_count <= 0 && now_s() >= end && (n >= 5 || now_s() >= end + 30)) break;
        double t0 = now_s();
        if (echo_once(fd, out, in, g_size)) {
            errors++;
            break;
        }
        double t1 = now_s();
        if (n == cap) {
            cap *= 2;
            lat = realloc(lat, cap * sizeof(double));
        }
        lat[n++] = t1 - t0;
        if (g_interval_ms > 0) usleep((useconds_t)(g_interval_ms * 1000));
    }
    close(fd);
    /* first_us: the first echo on the fresh session (with --interval-ms nothing warms the path first), so
     * open_us + first_us is a new session's time to its first response byte */
    printf("{\"mode\": \"rtt\", \"count\": %zu, \"errors\": %lld, \"open_us\": %.1f, \"first_us\": %.1f, ", n,
           errors, t_open * 1e6, n ? lat[0] * 1e6 : -1.0);
    print_latencies(lat, n);
    printf("}\n");
    return 0;
}

/* -- idle sessions ------------------------------------------------------------------------------ */
#define IDLE_THREADS 16
typedef struct {
    int *fds;
    int want, opened, errors;
} idle_arg;

static void *idle_thread(void *p) {
    idle_arg *a = p;
    unsigned char out[64], in[64];
    memset(out, 'x', sizeof out);
    while (a->opened < a->want && a->errors <= 10) {
        int fd = open_session(g_port);
        if (fd < 0 || echo_once(fd, out, in, 64)) {
            if (fd >= 0) close(fd);
            a->errors++;
            continue;
        }
        a->fds[a->opened++] = fd;
    }
    return NULL;
}

static int run_idle(void) {
    pthread_t th[IDLE_THREADS];
    idle_arg args[IDLE_THREADS];
    int opened = 0, errors = 0;
    double t0 = now_s();
    for (int i = 0; i < IDLE_THREADS; i++) {
        args[i].want = g_count / IDLE_THREADS + (i < g_count % IDLE_THREADS);
        args[i].fds = calloc((size_t)args[i].want + 1, sizeof(int));
        args[i].opened = args[i].errors = 0;
        pthread_create(&th[i], NULL, idle_thread, &args[i]);
    }
    for (int i = 0; i < IDLE_THREADS; i++) {
        pthread_join(th[i], NULL);
        opened += args[i].opened;
        errors += args[i].errors;
    }
    printf("{\"mode\": \"idle\", \"opened\": %d, \"errors\": %d, \"open_seconds\": %.3f}\n", opened, errors,
           now_s() - t0);
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) {
    }
    for (int i = 0; i < IDLE_THREADS; i++)
        for (int k = 0; k < args[i].opened; k++) close(args[i].fds[k]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen serve|bulk|rate|rtt|idle [options]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    const char *mode = argv[1];
    int echo_port = 0, source_port = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--proxy")) g_proxy_port = atoi(v);
        else if (!strcmp(k, "--user")) g_user = v;
        else if (!strcmp(k, "--pass")) g_pass = v;
        else if (!strcmp(k, "--port")) g_port = atoi(v);
        else if (!strcmp(k, "--streams")) g_streams = atoi(v);
        else if (!strcmp(k, "--conns")) g_conns = atoi(v);
        else if (!strcmp(k, "--count")) g_count = atoi(v);
        else if (!strcmp(k, "--size")) g_size = atoi(v);
        else if (!strcmp(k, "--duration")) g_duration = atof(v);
        else if (!strcmp(k, "--warmup")) g_warmup = atof(v);
        else if (!strcmp(k, "--interval-ms")) g_interval_ms = atof(v);
        else if (!strcmp(k, "--echo-port")) echo_port = atoi(v);
        else if (!strcmp(k, "--source-port")) source_port = atoi(v);
        else {
            fprintf(stderr, "unknown option %s\n", k);
            return 2;
        }
    }
    if (g_size > 4096) g_size = 4096;
    if (g_streams > 256) g_streams = 256;
    if (g_user && !g_pass) g_pass = "";
    if (!strcmp(mode, "serve")) return serve(echo_port, source_port);
    if (!strcmp(mode, "bulk")) return run_bulk();
    if (!strcmp(mode, "rate")) return run_rate();
    if (!strcmp(mode, "rtt")) return run_rtt();
    if (!strcmp(mode, "idle")) return run_idle();
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
