/*
 * Baseline for bench/cycle.ts: the smallest program doing one attach/detach cycle with the loop(4) ioctls.
 *
 *   cycle FILE CYCLES      → prints {"cycles":N,"ns":TOTAL,"median_ns":M,"busy":RETRIES} (one JSON line)
 *
 * One cycle = LOOP_CTL_GET_FREE, open /dev/loopN, LOOP_CONFIGURE (FILE, no flags), LOOP_CLR_FD, close —
 * the same ioctls as `using lo = ctl.loopForFd(fd)` in the TypeScript API. loop-control and FILE stay open
 * for the whole run, as in the other variants. EBUSY (another process took the free device first) is retried
 * on a fresh device and counted. No flock, no fstat checks: this is the floor, not a careful implementation.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s FILE CYCLES\n", argv[0]);
    return 2;
  }
  long cycles = strtol(argv[2], NULL, 10);
  if (cycles <= 0) {
    fprintf(stderr, "cycle: CYCLES must be positive\n");
    return 2;
  }
  long long *each = calloc((size_t)cycles, sizeof *each);
  if (!each) die("calloc");
  int backing = open(argv[1], O_RDWR | O_CLOEXEC);
  if (backing < 0) die("open backing file");
  int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) die("open /dev/loop-control");

  struct loop_config config;
  memset(&config, 0, sizeof config);
  config.fd = (unsigned)backing;
  strncpy((char *)config.info.lo_file_name, argv[1], LO_NAME_SIZE - 1);

  long busy = 0;
  long long start = now_ns();
  for (long i = 0; i < cycles; i++) {
    long long t0 = now_ns();
    for (;;) {
      int minor = ioctl(ctl, LOOP_CTL_GET_FREE);
      if (minor < 0) die("LOOP_CTL_GET_FREE");
      char path[32];
      snprintf(path, sizeof path, "/dev/loop%d", minor);
      int lo = open(path, O_RDWR | O_CLOEXEC);
      if (lo < 0) die(path);
      if (ioctl(lo, LOOP_CONFIGURE, &config) < 0) {
        if (errno != EBUSY) die("LOOP_CONFIGURE");
        busy++;
        close(lo);
        continue;
      }
      if (ioctl(lo, LOOP_CLR_FD) < 0) die("LOOP_CLR_FD");
      close(lo);
      break;
    }
    each[i] = now_ns() - t0;
  }
  long long elapsed = now_ns() - start;
  qsort(each, (size_t)cycles, sizeof *each, cmp_ll);
  printf("{\"cycles\":%ld,\"ns\":%lld,\"median_ns\":%lld,\"busy\":%ld}\n", cycles, elapsed, each[cycles / 2],
         busy);
  free(each);
  return 0;
}
