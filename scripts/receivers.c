// Receivers of a process's memory into fresh memory: the experiment behind the self-receive
// route in docs/performance.md ("Where the memory goes"). Each receives LEN bytes (after an
// 8-byte length) per connection into a fresh private anonymous mapping, answers with the byte
// count and unmaps it — fed by `benchprog mem-send ADDR MIB RUNS` from another testbed node:
//
//   gcc -O2 -pthread -o /tmp/receivers scripts/receivers.c
//   telefork testbed exec node2 -- /tmp/receivers 7402 ahead &
//   telefork testbed exec node1 -- target/release/benchprog mem-send 10.77.0.2:7402 4096 3
//
// Modes (the way the fresh memory gets its bytes):
//   fault      recv straight into the mapping: every page faulted in by the copy
//   ahead      the same, a second thread populating ahead (MADV_POPULATE_WRITE, 32 MiB steps)
//   copy2      recv into 1 MiB buffers, two threads placing them with UFFDIO_COPY (two
//              copies: the telefork restorer's design)
//   zeros      recv straight into the mapping, another thread populating it ahead with
//              UFFDIO_COPY of zeros (what a restorer can do for another process; 4 MiB steps)
//   zeros2     the same with two populating threads
//   zeros-near the same with one populating thread held at most 8 MiB ahead of the reads
// Not part of the build or the tests: a tool for measuring by hand.
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BUF (1 << 20)
#define NBUF 4
#define STEP (4 << 20)

static char *mem;
static size_t len;
static int uffd = -1;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void uffd_copy(char *dst, const char *src, size_t n) {
    struct uffdio_copy c = {.dst = (unsigned long)dst, .src = (unsigned long)src, .len = n, .mode = 0};
    if (ioctl(uffd, UFFDIO_COPY, &c)) die("UFFDIO_COPY");
}

static void open_uffd(void) {
    uffd = syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
    if (uffd < 0) die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(uffd, UFFDIO_API, &api)) die("UFFDIO_API");
    struct uffdio_register r = {.range = {(unsigned long)mem, len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &r)) die("UFFDIO_REGISTER");
}

// ahead: MADV_POPULATE_WRITE in 32 MiB steps.
static void *populate(void *unused) {
    for (size_t off = 0; off < len; off += 32 << 20) {
        size_t n = len - off < (32 << 20) ? len - off : (32 << 20);
        if (madvise(mem + off, n, MADV_POPULATE_WRITE)) die("MADV_POPULATE_WRITE");
    }
    return unused;
}

// zeros*: STEP-sized pieces claimed in order; `ready` = bytes from 0 all populated.
static const char *zeros; // never written: reads come from the kernel's zero page
static atomic_size_t next_piece, received;
static size_t ready, bound;
static char *done;

static void *fill_zeros(void *unused) {
    size_t pieces = (len + STEP - 1) / STEP;
    for (;;) {
        size_t k = atomic_fetch_add(&next_piece, 1);
        if (k >= pieces) return unused;
        size_t off = k * STEP, n = len - off < STEP ? len - off : STEP;
        if (bound) {
            pthread_mutex_lock(&mu);
            while (off > atomic_load(&received) + bound) pthread_cond_wait(&cv, &mu);
            pthread_mutex_unlock(&mu);
        }
        uffd_copy(mem + off, zeros, n);
        pthread_mutex_lock(&mu);
        done[k] = 1;
        while (ready < len && done[ready / STEP]) ready = ready + STEP < len ? ready + STEP : len;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
}

// copy2: the receiving thread fills buffers in order, placing threads take them in order.
static char *bufs[NBUF];
static size_t buf_len[NBUF];
static long buf_record[NBUF]; // record number held (+1), 0 when free
static long records, next_to_place;

static void *place(void *unused) {
    for (;;) {
        pthread_mutex_lock(&mu);
        long r = next_to_place;
        if (r >= records) {
            pthread_mutex_unlock(&mu);
            return unused;
        }
        next_to_place++;
        int i = r % NBUF;
        while (buf_record[i] != r + 1) pthread_cond_wait(&cv, &mu);
        pthread_mutex_unlock(&mu);
        uffd_copy(mem + (size_t)r * BUF, bufs[i], buf_len[i]);
        pthread_mutex_lock(&mu);
        buf_record[i] = 0;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
}

static size_t receive_straight(int s, int wait_for_fill) {
    size_t n = 0;
    while (n < len) {
        size_t upto = len;
        if (wait_for_fill) {
            pthread_mutex_lock(&mu);
            while (ready <= n) pthread_cond_wait(&cv, &mu);
            upto = ready;
            pthread_mutex_unlock(&mu);
        }
        ssize_t k = recv(s, mem + n, upto - n, wait_for_fill ? MSG_WAITALL : 0);
        if (k <= 0) break;
        n += k;
        if (bound) {
            pthread_mutex_lock(&mu);
            atomic_store(&received, n);
            pthread_cond_broadcast(&cv);
            pthread_mutex_unlock(&mu);
        }
    }
    return n;
}

static size_t receive_buffered(int s) {
    size_t n = 0;
    for (long r = 0; r < records; r++) {
        int i = r % NBUF;
        pthread_mutex_lock(&mu);
        while (buf_record[i] != 0) pthread_cond_wait(&cv, &mu);
        pthread_mutex_unlock(&mu);
        size_t want = len - (size_t)r * BUF < BUF ? len - (size_t)r * BUF : BUF;
        if (recv(s, bufs[i], want, MSG_WAITALL) != (ssize_t)want) die("short receive");
        pthread_mutex_lock(&mu);
        buf_len[i] = want;
        buf_record[i] = r + 1;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
        n += want;
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: receivers PORT fault|ahead|copy2|zeros|zeros2|zeros-near\n");
        return 2;
    }
    const char *mode = argv[2];
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (bind(l, (void *)&a, sizeof a) || listen(l, 4)) die("listen");
    zeros = mmap(0, STEP, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < NBUF; i++) bufs[i] = malloc(BUF);
    for (;;) {
        int s = accept(l, 0, 0);
        unsigned long want;
        if (s < 0 || recv(s, &want, 8, MSG_WAITALL) != 8 || want > (64UL << 30)) {
            close(s);
            continue;
        }
        len = want;
        mem = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) die("mmap");
        pthread_t th[2];
        int threads = 0;
        size_t n;
        if (!strcmp(mode, "fault")) {
            n = receive_straight(s, 0);
        } else if (!strcmp(mode, "ahead")) {
            pthread_create(&th[threads++], 0, populate, 0);
            n = receive_straight(s, 0);
        } else if (!strcmp(mode, "copy2")) {
            open_uffd();
            records = (len + BUF - 1) / BUF;
            next_to_place = 0;
            for (int i = 0; i < 2; i++) pthread_create(&th[threads++], 0, place, 0);
            n = receive_buffered(s);
        } else if (!strncmp(mode, "zeros", 5)) {
            open_uffd();
            done = calloc((len + STEP - 1) / STEP, 1);
            ready = 0;
            atomic_store(&next_piece, 0);
            atomic_store(&received, 0);
            bound = !strcmp(mode, "zeros-near") ? (8 << 20) : 0;
            int fillers = !strcmp(mode, "zeros2") ? 2 : 1;
            for (int i = 0; i < fillers; i++) pthread_create(&th[threads++], 0, fill_zeros, 0);
            n = receive_straight(s, 1);
        } else {
            fprintf(stderr, "unknown mode %s\n", mode);
            return 2;
        }
        for (int i = 0; i < threads; i++) pthread_join(th[i], 0);
        if (uffd >= 0) close(uffd);
        uffd = -1;
        free(done);
        done = 0;
        send(s, &n, 8, 0);
        munmap(mem, len);
        close(s);
    }
}
