/*
 * example.c - a game server's view of traits_agent.h.
 *
 *   cc -std=c99 -Wall -Wextra -O2 -o example example.c
 *   ./example [EVENTS]          # EVENTS level-ups in a tight loop (default 3), plus one of
 *                               # each other kind; prints what was sent and dropped
 *
 * The agent is found through $TRAITS_AGENT_SOCKET, the system service's socket or the
 * per-user default. Exit status 0 whether or not an agent is running: the game goes on.
 */
#define TRAITS_AGENT_IMPLEMENTATION
#include "traits_agent.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    long events = argc > 1 ? atol(argv[1]) : 3;
    long i;
    char user[32];
    ta_stats st;
    ta_client *ta = ta_open(NULL);
    if (!ta) return 1; /* out of memory */

    for (i = 0; i < events; i++) { /* the server's tick loop would go here */
        snprintf(user, sizeof user, "c-%07ld", i);
        ta_level_up(ta, user, i % 100 + 1);
    }
    ta_tick(ta); /* once per server tick: sends what is due */

    /* an action with parameters, built field by field */
    ta_begin(ta, "actions", 1546355045.25);
    ta_str(ta, "user_id", "c-1");
    ta_str(ta, "action_id", "2002");
    ta_str(ta, "action_name", "buy_item");
    ta_array_begin(ta, "action_params");
    ta_map_begin(ta, NULL);
    ta_str(ta, "key", "item_id");
    ta_str(ta, "value", "3003");
    ta_map_end(ta);
    ta_array_end(ta);
    ta_end(ta);

    ta_purchase(ta, "c-1", "2002", 1, 25.5);
    ta_virtual_purchase(ta, "c-1", "2002", 1, 25.5, "gold");
    ta_begin(ta, "logins", 0);
    ta_str(ta, "user_id", "c-1");
    ta_int(ta, "level", 10);
    ta_str(ta, "country", "US");
    ta_end(ta);
    ta_begin(ta, "social-dynamics", 0);
    ta_str(ta, "user_id", "c-1");
    ta_str(ta, "target_user_id", "c-2");
    ta_str(ta, "connection", "linked");
    ta_str(ta, "interaction", "friend");
    ta_end(ta);
    ta_begin(ta, "items", 0);
    ta_str(ta, "item_id", "2002");
    ta_double(ta, "price", 25.5);
    ta_str(ta, "currency", "USD");
    ta_str(ta, "name", "Axe");
    ta_end(ta);

    printf("socket %s\n", ta_socket_path(ta));
    ta_close(ta, -1, &st); /* flushes; what could not leave is counted as dropped */
    printf("emitted %ld sent %" PRIu64 " dropped %" PRIu64 " (agent_down %" PRIu64
           " queue_full %" PRIu64 " too_large %" PRIu64 ")\n",
           events + 6, st.sent, st.dropped, st.agent_down, st.queue_full, st.too_large);
    return 0;
}
