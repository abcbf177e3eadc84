/*
 * bench_client.c - µs per event for the C client (clients/c/traits_agent.h); run by
 * bench/bench_client.py, which compiles it and runs a receiver that drains the socket.
 *
 *   bench_client N     N actions with one parameter in a tight loop; prints µs/event for the
 *                      loop (wall, then CPU time), with the final close, then sent, dropped
 */
#define TRAITS_AGENT_IMPLEMENTATION
#include "../clients/c/traits_agent.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double clock_s(clockid_t which) {
    struct timespec ts;
    clock_gettime(which, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}
static double now(void) { return clock_s(CLOCK_MONOTONIC); }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 20000, i;
    ta_stats st;
    ta_client *ta = ta_open(NULL);
    double started, looped, cpu;
    if (!ta) return 1;
    started = now();
    cpu = clock_s(CLOCK_THREAD_CPUTIME_ID);
    for (i = 0; i < n; i++) {
        ta_begin(ta, "actions", 0);
        ta_str(ta, "user_id", "1001");
        ta_str(ta, "action_id", "2002");
        ta_str(ta, "action_name", "buy_item");
        ta_map_begin(ta, "action_params");
        ta_int(ta, "item_id", i);
        ta_map_end(ta);
        ta_end(ta);
    }
    looped = now();
    cpu = clock_s(CLOCK_THREAD_CPUTIME_ID) - cpu;
    ta_close(ta, 5000, &st);
    printf("%.3f %.3f %.3f %" PRIu64 " %" PRIu64 "\n", (looped - started) / (double)n * 1e6,
           cpu / (double)n * 1e6, (now() - started) / (double)n * 1e6, st.sent, st.dropped);
    return 0;
}
