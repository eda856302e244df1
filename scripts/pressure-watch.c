/*
 * pressure-watch: for bench/guest-pressure.ts, in the end-to-end guest. Polls /proc/vmstat and
 * /proc/meminfo every millisecond and prints, in ms since its start (CLOCK_MONOTONIC):
 *   WATCH ONSET <ms>     the first reclaim pass (kswapd run or direct-reclaim stall): pressure begins
 *   WATCH DEFLATED <ms>  the first rise of MemTotal: the balloon gave back its first page
 *                        (without DEFLATE_ON_OOM, ballooned pages leave MemTotal)
 * Exits once both were seen, or after TIMEOUT_S seconds. Usage: pressure-watch TIMEOUT_S
 * It runs SCHED_FIFO so that a guest busy allocating does not delay its polls.
 */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* kswapd runs plus direct-reclaim stalls, from /proc/vmstat. */
static long reclaim_events(void) {
  char key[64];
  long v, sum = 0;
  FILE *f = fopen("/proc/vmstat", "r");
  if (f == NULL) return -1;
  while (fscanf(f, "%63s %ld", key, &v) == 2)
    if (strcmp(key, "pageoutrun") == 0 || strncmp(key, "allocstall_", 11) == 0) sum += v;
  fclose(f);
  return sum;
}

static long mem_total_kb(void) {
  char line[128];
  long v = -1;
  FILE *f = fopen("/proc/meminfo", "r");
  if (f == NULL) return -1;
  while (fgets(line, sizeof line, f) != NULL)
    if (sscanf(line, "MemTotal: %ld kB", &v) == 1) break;
  fclose(f);
  return v;
}

int main(int argc, char **argv) {
  double timeout_ms = (argc > 1 ? atof(argv[1]) : 60) * 1e3;
  double start = now_ms(), onset = -1, deflated = -1;
  long reclaim0 = reclaim_events(), total0 = mem_total_kb();
  struct timespec ms = {0, 1000000};
  struct sched_param prio = {.sched_priority = 50};
  if (sched_setscheduler(0, SCHED_FIFO, &prio) != 0) perror("sched_setscheduler");
  printf("WATCH START\n");
  fflush(stdout);
  while ((onset < 0 || deflated < 0) && now_ms() - start < timeout_ms) {
    double t = now_ms() - start;
    if (onset < 0 && reclaim_events() > reclaim0) {
      onset = t;
      printf("WATCH ONSET %.1f\n", onset);
      fflush(stdout);
    }
    if (deflated < 0 && mem_total_kb() > total0) {
      deflated = t;
      printf("WATCH DEFLATED %.1f\n", deflated);
      fflush(stdout);
    }
    nanosleep(&ms, NULL);
  }
  printf("WATCH END\n");
  return 0;
}
