/*
 * Baseline for bench/cycle.ts: the smallest program doing one attach/detach cycle with the loop(4) ioctls.
 *
 *   cycle FILE CYCLES [handoff]  → prints {"cycles":N,"ns":TOTAL,"median_ns":M,"busy":RETRIES} (one JSON line)
 *
 * One cycle = LOOP_CTL_GET_FREE, open /dev/loopN, LOOP_CONFIGURE (FILE, no flags), LOOP_CLR_FD, close —
 * the same ioctls as `using lo = ctl.loopForFd(fd)` in the TypeScript API. loop-control and FILE stay open
 * for the whole run, as in the other variants. EBUSY (another process took the free device first) is retried
 * on a fresh device and counted. No flock, no fstat checks: this is the floor, not a careful implementation.
 *
 * `handoff` runs each half of the cycle (get-free + open + configure; clear + close) on a worker thread and
 * waits for it the way Node waits for its thread pool: the job is passed under a mutex with a condition
 * variable, the reply comes back through an eventfd the main thread sleeps on in epoll_wait. That is the floor
 * of any async API whose blocking part runs on another thread: the same ioctls plus two hand-offs each way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp_ll(const void *a, const void *b) {
  long long x = *(const long long *)a, y = *(const long long *)b;
  return (x > y) - (x < y);
}

static void die(const char *what) {
  fprintf(stderr, "cycle: %s: %s\n", what, strerror(errno));
  exit(1);
}

static int ctl = -1;
static struct loop_config config;
static long busy = 0;
static int lo = -1;

/* LOOP_CTL_GET_FREE, open, LOOP_CONFIGURE: leaves the bound device open in `lo`. */
static void bind_free_device(void) {
  for (;;) {
    int minor = ioctl(ctl, LOOP_CTL_GET_FREE);
    if (minor < 0) die("LOOP_CTL_GET_FREE");
    char path[32];
    snprintf(path, sizeof path, "/dev/loop%d", minor);
    lo = open(path, O_RDWR | O_CLOEXEC);
    if (lo < 0) die(path);
    if (ioctl(lo, LOOP_CONFIGURE, &config) == 0) return;
    if (errno != EBUSY) die("LOOP_CONFIGURE");
    busy++;
    close(lo);
  }
}

static void release_device(void) {
  if (ioctl(lo, LOOP_CLR_FD) < 0) die("LOOP_CLR_FD");
  close(lo);
  lo = -1;
}

/* The worker of `handoff` mode: one job at a time, like one of libuv's pool threads. */
enum job { NONE, BIND, RELEASE, STOP };
static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queued = PTHREAD_COND_INITIALIZER;
static enum job next = NONE;
static int done_fd = -1, epoll_fd = -1;

static void *worker(void *unused) {
  (void)unused;
  for (;;) {
    pthread_mutex_lock(&mutex);
    while (next == NONE) pthread_cond_wait(&queued, &mutex);
    enum job job = next;
    next = NONE;
    pthread_mutex_unlock(&mutex);
    if (job == STOP) return NULL;
    if (job == BIND) bind_free_device();
    else release_device();
    uint64_t one = 1;
    if (write(done_fd, &one, sizeof one) != sizeof one) die("write eventfd");
  }
}

/* Queues `job` for the worker and sleeps until it reports back. */
static void handoff(enum job job) {
  pthread_mutex_lock(&mutex);
  next = job;
  pthread_cond_signal(&queued);
  pthread_mutex_unlock(&mutex);
  if (job == STOP) return;
  struct epoll_event ev;
  while (epoll_wait(epoll_fd, &ev, 1, -1) < 0)
    if (errno != EINTR) die("epoll_wait");
  uint64_t n;
  if (read(done_fd, &n, sizeof n) != sizeof n) die("read eventfd");
}

int main(int argc, char **argv) {
  if (argc != 3 && !(argc == 4 && strcmp(argv[3], "handoff") == 0)) {
    fprintf(stderr, "usage: %s FILE CYCLES [handoff]\n", argv[0]);
    return 2;
  }
  int threaded = argc == 4;
  long cycles = strtol(argv[2], NULL, 10);
  if (cycles <= 0) {
    fprintf(stderr, "cycle: CYCLES must be positive\n");
    return 2;
  }
  long long *each = calloc((size_t)cycles, sizeof *each);
  if (!each) die("calloc");
  int backing = open(argv[1], O_RDWR | O_CLOEXEC);
  if (backing < 0) die("open backing file");
  ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) die("open /dev/loop-control");

  memset(&config, 0, sizeof config);
  config.fd = (unsigned)backing;
  strncpy((char *)config.info.lo_file_name, argv[1], LO_NAME_SIZE - 1);

  pthread_t thread;
  if (threaded) {
    done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (done_fd < 0 || epoll_fd < 0) die("eventfd/epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, done_fd, &ev) < 0) die("epoll_ctl");
    errno = pthread_create(&thread, NULL, worker, NULL);
    if (errno) die("pthread_create");
  }

  long long start = now_ns();
  for (long i = 0; i < cycles; i++) {
    long long t0 = now_ns();
    if (threaded) {
      handoff(BIND);
      handoff(RELEASE);
    } else {
      bind_free_device();
      release_device();
    }
    each[i] = now_ns() - t0;
  }
  long long elapsed = now_ns() - start;
  if (threaded) {
    handoff(STOP);
    pthread_join(thread, NULL);
  }
  qsort(each, (size_t)cycles, sizeof *each, cmp_ll);
  printf("{\"cycles\":%ld,\"ns\":%lld,\"median_ns\":%lld,\"busy\":%ld}\n", cycles, elapsed, each[cycles / 2],
         busy);
  free(each);
  return 0;
}
