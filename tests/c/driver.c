/*
 * driver.c - drives traits_agent.h for tests/test_c_client.py (compiled by the test).
 *
 *   driver burst N [MAX_DATAGRAM]     N level-ups in a tight loop, then close
 *   driver ticks PER_TICK TICKS       PER_TICK level-ups, ta_tick, 1 ms sleep; TICKS times
 *   driver types                      one event of each value kind, for the decoder
 *   driver fork                       one event buffered, fork: each process sends its own
 *   driver interval                   one event, then only ta_tick (1 ms apart) until it left;
 *                                     prints "ticks_until_sent=N" first
 *
 * Prints the final counts on one line: key=value ... ($DRIVER_CLOSE_MS: ta_close's wait, 5000)
 */
#define TRAITS_AGENT_IMPLEMENTATION
#include "../../clients/c/traits_agent.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void report(long emitted, const ta_stats *st) {
    printf("emitted=%ld sent=%" PRIu64 " dropped=%" PRIu64 " agent_down=%" PRIu64
           " queue_full=%" PRIu64 " too_large=%" PRIu64 " unknown_resource=%" PRIu64
           " no_memory=%" PRIu64 " send_error=%" PRIu64 " pending=%" PRIu64 "\n",
           emitted, st->sent, st->dropped, st->agent_down, st->queue_full, st->too_large,
           st->unknown_resource, st->no_memory, st->send_error, st->pending);
    fflush(stdout);
}

static void level_up(ta_client *ta, long i) {
    char user[32];
    snprintf(user, sizeof user, "c-%07ld", i);
    ta_level_up(ta, user, i % 100 + 1);
}

int main(int argc, char **argv) {
    ta_options opt;
    ta_stats st;
    ta_client *ta;
    long i, emitted = 0;
    const char *mode = argc > 1 ? argv[1] : "burst";
    memset(&opt, 0, sizeof opt);
    if (strcmp(mode, "burst") == 0 && argc > 3) opt.max_datagram = (size_t)atol(argv[3]);
    ta = ta_open(&opt);
    if (!ta) return 2;
    if (strcmp(mode, "burst") == 0) {
        long n = argc > 2 ? atol(argv[2]) : 20000;
        for (i = 0; i < n; i++) level_up(ta, emitted++);
    } else if (strcmp(mode, "ticks") == 0) {
        long per_tick = atol(argv[2]), ticks = atol(argv[3]), t;
        struct timespec ms;
        ms.tv_sec = 0;
        ms.tv_nsec = 1000000;
        for (t = 0; t < ticks; t++) {
            for (i = 0; i < per_tick; i++) level_up(ta, emitted++);
            ta_tick(ta);
            nanosleep(&ms, NULL);
        }
    } else if (strcmp(mode, "types") == 0) {
        static char long_text[70000];
        memset(long_text, 'x', sizeof long_text - 1);
        ta_begin(ta, "game.Level-Ups", 1546355045.5);
        ta_str(ta, "user_id", "u1");
        ta_int(ta, "level", 10);
        ta_int(ta, "zero", 0);
        ta_int(ta, "i8", -100);
        ta_int(ta, "i16", -30000);
        ta_int(ta, "i32", -2000000000);
        ta_int(ta, "i64", INT64_MIN);
        ta_int(ta, "u8", 200);
        ta_int(ta, "u16", 60000);
        ta_int(ta, "u32", 4000000000);
        ta_int(ta, "u64", INT64_MAX);
        ta_int(ta, "neg", -5);
        ta_double(ta, "price", 25.5);
        ta_bool(ta, "yes", 1);
        ta_bool(ta, "no", 0);
        ta_nil(ta, "nothing");
        ta_str(ta, "null_string", NULL);
        ta_strn(ta, "s8", long_text, 100);
        ta_strn(ta, "s16", long_text, 1000);
        ta_str(ta, "utf8", "caf\xc3\xa9");
        ta_array_begin(ta, "params");
        ta_map_begin(ta, NULL);
        ta_str(ta, "key", "item_id");
        ta_int(ta, "value", 3003);
        ta_map_end(ta);
        ta_str(ta, NULL, "plain");
        ta_array_end(ta);
        ta_map_begin(ta, "empty");
        ta_map_end(ta);
        ta_end(ta);
        emitted++;
        ta_begin(ta, "actions", 7); /* a whole-second time: an int on the wire */
        ta_end(ta);
        emitted++;
        ta_begin(ta, "no_such_resource", 0); /* dropped: unknown_resource */
        ta_str(ta, "user_id", "u1");
        ta_end(ta);
        emitted++;
        ta_begin(ta, "actions", 0); /* dropped: too_large for the agent */
        ta_strn(ta, "blob", long_text, sizeof long_text - 1);
        ta_end(ta);
        emitted++;
    } else if (strcmp(mode, "interval") == 0) {
        struct timespec ms;
        long ticks = 0;
        ms.tv_sec = 0;
        ms.tv_nsec = 1000000;
        opt.flush_interval = 0.05;
        ta_close(ta, 0, NULL);
        ta = ta_open(&opt);
        if (!ta) return 2;
        ta_level_up(ta, "u", 1);
        emitted++;
        ta_get_stats(ta, &st);
        while (st.sent == 0 && ticks < 60000) { /* a hang guard: 60 s */
            nanosleep(&ms, NULL);
            ta_tick(ta);
            ticks++;
            ta_get_stats(ta, &st);
        }
        printf("ticks_until_sent=%ld sent_before_close=%" PRIu64 "\n", ticks, st.sent);
    } else if (strcmp(mode, "fork") == 0) {
        pid_t pid;
        int status = 0;
        ta_level_up(ta, "parent", 1);
        emitted++;
        pid = fork();
        if (pid == 0) {
            ta_get_stats(ta, &st);
            if (ta_level_up(ta, "child", 2) != 1) _exit(3);
            ta_close(ta, 1000, &st); /* the child's own counts: its one event */
            _exit(st.sent == 1 && st.dropped == 0 ? 0 : 4);
        }
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return 5;
    }
    ta_close(ta, getenv("DRIVER_CLOSE_MS") ? atoi(getenv("DRIVER_CLOSE_MS")) : 5000, &st);
    report(emitted, &st);
    return 0;
}
