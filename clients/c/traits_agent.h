/*
 * traits_agent.h - a single-header C99 client for traits-agent (usable from C++).
 *
 * Hands game analytics events to the local traits-agent over its Unix datagram socket. Made
 * for a game server's hot loop, with the same rules as the Python client:
 *
 *   - It packs. Events are msgpack-encoded into datagrams of at most `max_datagram` bytes
 *     (32 KiB), one Fluentd Forward entry `[tag, [[time, record], ...]]` per resource. A
 *     datagram leaves when the next event would not fit, when `flush_interval` (0.1 s) has
 *     passed since its first event (checked on every event and on ta_tick(): call it once per
 *     server tick, it costs a clock read), on ta_flush() and on ta_close().
 *   - It never blocks and never aborts. The socket is non-blocking. When the agent's queue is
 *     full (EAGAIN) sealed datagrams are held, in order, up to `max_buffer` bytes (8 MiB) and
 *     sent on later events, ticks and flushes; past the bound the oldest are dropped. Agent
 *     down, socket missing, an event too large, out of memory: the events are dropped and
 *     counted by reason (ta_get_stats). Once closed, sent + dropped == events emitted.
 *   - Where the agent is: $TRAITS_AGENT_SOCKET (a path, or @name for the abstract namespace),
 *     else the system service's /run/traits-agent/events.sock when it exists, else the
 *     per-user default $XDG_RUNTIME_DIR/traits-agent/events.sock (or
 *     /run/user/<uid>/traits-agent/..., else $TMPDIR-or-/tmp/runtime-<uid>/traits-agent/...).
 *   - fork(): the child's clients start over with an empty buffer, zeroed counters and their
 *     own socket (pthread_atfork; define TRAITS_AGENT_NO_ATFORK to leave it out, then do not
 *     use a client across fork()).
 *   - One client per thread: a client is not locked.
 *
 * Use: in exactly one .c/.cpp file, before any other #include,
 *
 *     #define TRAITS_AGENT_IMPLEMENTATION
 *     #include "traits_agent.h"
 *
 * and include it plainly elsewhere. An event:
 *
 *     ta_client *ta = ta_open(NULL);              // NULL options: the defaults
 *     ta_begin(ta, "level_ups", 0);               // time 0: now
 *     ta_str(ta, "user_id", "1001");
 *     ta_int(ta, "level", 10);
 *     ta_end(ta);                                 // or ta_level_up(ta, "1001", 10);
 *     ...
 *     ta_close(ta, -1, NULL);                     // flush, wait <= 1 s for a full queue, free
 *
 * Values: ta_str, ta_strn, ta_int, ta_double, ta_bool, ta_nil; nested maps and arrays with
 * ta_map_begin/ta_map_end and ta_array_begin/ta_array_end (inside an array, pass key NULL).
 * The agent validates: see its README for each resource's fields.
 */
#ifndef TRAITS_AGENT_H
#define TRAITS_AGENT_H

#if defined(TRAITS_AGENT_IMPLEMENTATION) && !defined(_POSIX_C_SOURCE) && !defined(_GNU_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime, fcntl, ... under -std=c99 */
#endif

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ta_client ta_client;

typedef struct ta_options {
    const char *socket_path;   /* NULL: found as described above */
    size_t max_datagram;       /* 0: 32768 (at most 65507, the agent's limit) */
    size_t max_buffer;         /* 0: 8 MiB held while the agent's queue is full */
    double flush_interval;     /* seconds; 0: 0.1; < 0: each event leaves at once */
    double reconnect_interval; /* seconds between attempts while the agent is down; 0: 1 */
} ta_options;

typedef struct ta_stats {
    uint64_t sent;    /* events that left */
    uint64_t dropped; /* events dropped, the sum of the reasons below */
    uint64_t agent_down, queue_full, too_large, unknown_resource, no_memory, send_error;
    uint64_t pending; /* events buffered or held: neither sent nor dropped yet */
} ta_stats;

/* A client; NULL only when out of memory. Never fails for a missing agent. */
ta_client *ta_open(const ta_options *options);
/* Flush, wait at most timeout_ms (< 0: 1000) while the agent takes held datagrams, drop and
 * count the rest, close the socket and free the client. The final counts go to `final_stats`
 * (may be NULL): there, sent + dropped is every event emitted. */
void ta_close(ta_client *c, int timeout_ms, ta_stats *final_stats);

/* An event of `resource` (actions, logins, purchases, virtual_purchases, level_ups, items,
 * social_dynamics, playfab; `level-ups`, `game.level_ups`, `users` work too). `time`: seconds
 * since the epoch, <= 0 for now. Returns 1, or 0 if the event is dropped (unknown resource). */
int ta_begin(ta_client *c, const char *resource, double time);
void ta_str(ta_client *c, const char *key, const char *value);
void ta_strn(ta_client *c, const char *key, const char *value, size_t length);
void ta_int(ta_client *c, const char *key, int64_t value);
void ta_double(ta_client *c, const char *key, double value);
void ta_bool(ta_client *c, const char *key, int value);
void ta_nil(ta_client *c, const char *key);
void ta_map_begin(ta_client *c, const char *key);
void ta_map_end(ta_client *c);
void ta_array_begin(ta_client *c, const char *key);
void ta_array_end(ta_client *c);
/* Ends the event: 1 when it left or waits in the buffer, 0 when it was dropped (counted). */
int ta_end(ta_client *c);

/* Typed shortcuts (time: now). */
int ta_level_up(ta_client *c, const char *user_id, int64_t level);
int ta_action(ta_client *c, const char *user_id, const char *action_id, const char *action_name);
int ta_purchase(ta_client *c, const char *user_id, const char *item_id, int64_t count,
                double price);
int ta_virtual_purchase(ta_client *c, const char *user_id, const char *item_id, int64_t count,
                        double virtual_price, const char *currency);

/* Sends what is due (flush_interval) and what is held; call once per server tick. Returns 1
 * when nothing waits any more. */
int ta_tick(ta_client *c);
/* Sends everything now; 1 if all of it left (a full queue keeps the rest held). */
int ta_flush(ta_client *c);
void ta_get_stats(const ta_client *c, ta_stats *out);
/* The socket path in use (for messages). */
const char *ta_socket_path(const ta_client *c);

#ifdef __cplusplus
}
#endif
#endif /* TRAITS_AGENT_H */

/* ================================================================== implementation */
#ifdef TRAITS_AGENT_IMPLEMENTATION
#ifndef TRAITS_AGENT_IMPLEMENTED
#define TRAITS_AGENT_IMPLEMENTED

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#ifndef TRAITS_AGENT_NO_ATFORK
#include <pthread.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif
#ifndef MSG_DONTWAIT
#define MSG_DONTWAIT 0
#endif

#define TA__AGENT_MAX 65507u /* the largest datagram the agent takes */
#define TA__DEPTH 16         /* nesting of maps/arrays in a record */
#define TA__NRES 8

static const char *const ta__resources[TA__NRES] = {
    "actions", "logins", "purchases", "virtual_purchases",
    "level_ups", "items", "social_dynamics", "playfab"};

typedef struct ta__held {
    struct ta__held *next;
    size_t len;
    uint32_t events;
    unsigned char data[1];
} ta__held;

typedef struct ta__res { /* the entries of one resource in the datagram being built */
    unsigned char *buf;
    size_t len;
    uint32_t events;
} ta__res;

struct ta_client {
    ta_options opt;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
    int fd;
    double retry_at;
    unsigned long fork_generation;
    /* the event being built */
    unsigned char *ev;
    size_t ev_len;
    int ev_res; /* -1: no event; -2: an event being dropped (unknown resource) */
    int ev_overflow;
    size_t stack[TA__DEPTH];
    unsigned char kinds[TA__DEPTH]; /* 0xde map, 0xdc array */
    uint32_t counts[TA__DEPTH];
    int depth;
    /* the datagram being built */
    ta__res res[TA__NRES];
    size_t pending_bytes;
    uint32_t pending_events;
    double flush_at;
    unsigned char *seal;
    /* sealed datagrams the agent's full queue refused, oldest first */
    ta__held *held_head, *held_tail;
    size_t held_bytes;
    uint64_t held_events;
    ta_stats st;
};

/* ---------------------------------------------------------------- clock, fork */

static double ta__monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static volatile unsigned long ta__generation = 0;
#ifndef TRAITS_AGENT_NO_ATFORK
static void ta__in_child(void) { ta__generation = ta__generation + 1; }
static pthread_once_t ta__atfork_once = PTHREAD_ONCE_INIT;
static void ta__register_atfork(void) { pthread_atfork(NULL, NULL, ta__in_child); }
#endif

/* ---------------------------------------------------------------- where the agent is */

static int ta__is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static void ta__find_socket(char *out, size_t size) {
    const char *env = getenv("TRAITS_AGENT_SOCKET");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    const char *tmp = getenv("TMPDIR");
    char run_user[64];
    struct stat st;
    if (env && *env) {
        snprintf(out, size, "%s", env);
        return;
    }
    if (stat("/run/traits-agent/events.sock", &st) == 0) {
        snprintf(out, size, "%s", "/run/traits-agent/events.sock");
        return;
    }
    if (xdg && xdg[0] == '/' && ta__is_dir(xdg)) {
        snprintf(out, size, "%s/traits-agent/events.sock", xdg);
        return;
    }
    snprintf(run_user, sizeof run_user, "/run/user/%lu", (unsigned long)geteuid());
    if (ta__is_dir(run_user)) {
        snprintf(out, size, "%s/traits-agent/events.sock", run_user);
        return;
    }
    if (!(tmp && tmp[0] == '/' && ta__is_dir(tmp))) tmp = "/tmp";
    snprintf(out, size, "%s/runtime-%lu/traits-agent/events.sock", tmp, (unsigned long)geteuid());
}

/* ---------------------------------------------------------------- socket */

static int ta__connect(ta_client *c) {
    struct sockaddr_un addr;
    socklen_t addrlen;
    size_t n = strlen(c->path);
    int fd, sndbuf = 1 << 20, flags;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (n == 0 || n >= sizeof addr.sun_path) goto fail;
    memcpy(addr.sun_path, c->path, n);
    if (c->path[0] == '@') addr.sun_path[0] = '\0'; /* abstract namespace (Linux) */
    addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (c->path[0] != '@'));
    fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (fd < 0) goto fail;
    flags = fcntl(fd, F_GETFL, 0);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
        close(fd);
        goto fail;
    }
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    /* the sender's buffer bounds the bytes in flight to the agent; capped by wmem_max */
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    if (connect(fd, (struct sockaddr *)&addr, addrlen) != 0) {
        close(fd);
        goto fail;
    }
    c->fd = fd;
    return 1;
fail:
    c->retry_at = ta__monotonic() + c->opt.reconnect_interval;
    return 0;
}

static void ta__disconnect(ta_client *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

enum { TA__SENT, TA__FULL, TA__DOWN, TA__TOO_LARGE, TA__ERROR };

static int ta__classify(int err) {
    if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) return TA__FULL;
    if (err == EMSGSIZE) return TA__TOO_LARGE;
    if (err == ECONNREFUSED || err == ENOENT || err == ENOTCONN || err == EPIPE ||
        err == ECONNRESET || err == EDESTADDRREQ)
        return TA__DOWN;
    return TA__ERROR;
}

/* One datagram, never waiting: TA__SENT or why not. */
static int ta__transmit(ta_client *c, const unsigned char *data, size_t len) {
    int why;
    if (c->fd < 0) {
        if (ta__monotonic() < c->retry_at || !ta__connect(c)) return TA__DOWN;
    }
    if (send(c->fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) return TA__SENT;
    why = ta__classify(errno);
    if (why != TA__DOWN) return why;
    /* the agent restarted and re-created its socket: reconnect once, at once */
    ta__disconnect(c);
    if (!ta__connect(c)) return TA__DOWN;
    if (send(c->fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) return TA__SENT;
    why = ta__classify(errno);
    return why;
}

static void ta__drop(ta_client *c, uint64_t events, int why) {
    c->st.dropped += events;
    switch (why) {
    case TA__FULL: c->st.queue_full += events; break;
    case TA__DOWN: c->st.agent_down += events; break;
    case TA__TOO_LARGE: c->st.too_large += events; break;
    default: c->st.send_error += events; break;
    }
}

/* ---------------------------------------------------------------- msgpack */

static void ta__put(ta_client *c, const void *p, size_t n) {
    if (c->ev_overflow || c->ev_len + n > TA__AGENT_MAX) {
        c->ev_overflow = 1;
        return;
    }
    memcpy(c->ev + c->ev_len, p, n);
    c->ev_len += n;
}

static void ta__put1(ta_client *c, unsigned char b) { ta__put(c, &b, 1); }

static void ta__put_be(ta_client *c, unsigned char lead, uint64_t v, int bytes) {
    unsigned char b[9];
    int i;
    b[0] = lead;
    for (i = 0; i < bytes; i++) b[1 + i] = (unsigned char)(v >> (8 * (bytes - 1 - i)));
    ta__put(c, b, (size_t)bytes + 1);
}

static size_t ta__str_header(unsigned char *b, size_t n) {
    if (n < 32) { b[0] = (unsigned char)(0xa0 | n); return 1; }
    if (n < 256) { b[0] = 0xd9; b[1] = (unsigned char)n; return 2; }
    if (n < 65536) {
        b[0] = 0xda; b[1] = (unsigned char)(n >> 8); b[2] = (unsigned char)n; return 3;
    }
    b[0] = 0xdb; b[1] = (unsigned char)(n >> 24); b[2] = (unsigned char)(n >> 16);
    b[3] = (unsigned char)(n >> 8); b[4] = (unsigned char)n;
    return 5;
}

static void ta__put_str(ta_client *c, const char *s, size_t n) {
    unsigned char h[5];
    ta__put(c, h, ta__str_header(h, n));
    ta__put(c, s, n);
}

static void ta__put_int(ta_client *c, int64_t v) {
    if (v >= 0) {
        uint64_t u = (uint64_t)v;
        if (u < 128) ta__put1(c, (unsigned char)u);
        else if (u < 256) ta__put_be(c, 0xcc, u, 1);
        else if (u < 65536) ta__put_be(c, 0xcd, u, 2);
        else if (u <= 0xffffffffu) ta__put_be(c, 0xce, u, 4);
        else ta__put_be(c, 0xcf, u, 8);
    } else if (v >= -32) {
        ta__put1(c, (unsigned char)(int8_t)v);
    } else if (v >= -128) {
        ta__put_be(c, 0xd0, (uint64_t)v, 1);
    } else if (v >= -32768) {
        ta__put_be(c, 0xd1, (uint64_t)v, 2);
    } else if (v >= -2147483647 - 1) {
        ta__put_be(c, 0xd2, (uint64_t)v, 4);
    } else {
        ta__put_be(c, 0xd3, (uint64_t)v, 8);
    }
}

/* A value is being written inside the current container: key (in a map), then count it. */
static int ta__value(ta_client *c, const char *key) {
    if (c->ev_res < 0) return 0; /* no event, or one being dropped */
    if (c->depth > 0) {
        if (c->kinds[c->depth - 1] == 0xde) {
            if (!key) { c->ev_overflow = 1; return 0; } /* a map value needs a key */
            ta__put_str(c, key, strlen(key));
        }
        c->counts[c->depth - 1]++;
    }
    return 1;
}

static void ta__open_container(ta_client *c, unsigned char lead) {
    if (c->depth >= TA__DEPTH) { c->ev_overflow = 1; return; }
    c->stack[c->depth] = c->ev_len;
    c->kinds[c->depth] = lead;
    c->counts[c->depth] = 0;
    c->depth++;
    ta__put_be(c, lead, 0, 2); /* map16/array16, count patched on close */
}

static void ta__close_container(ta_client *c) {
    size_t at;
    uint32_t n;
    if (c->depth <= 0) return;
    c->depth--;
    at = c->stack[c->depth];
    n = c->counts[c->depth];
    if (n > 65535) { c->ev_overflow = 1; return; }
    if (!c->ev_overflow) {
        c->ev[at + 1] = (unsigned char)(n >> 8);
        c->ev[at + 2] = (unsigned char)n;
    }
}

void ta_str(ta_client *c, const char *key, const char *value) {
    if (value == NULL) { ta_nil(c, key); return; }
    ta_strn(c, key, value, strlen(value));
}
void ta_strn(ta_client *c, const char *key, const char *value, size_t length) {
    if (ta__value(c, key)) ta__put_str(c, value, length);
}
void ta_int(ta_client *c, const char *key, int64_t value) {
    if (ta__value(c, key)) ta__put_int(c, value);
}
void ta_double(ta_client *c, const char *key, double value) {
    uint64_t bits;
    if (!ta__value(c, key)) return;
    memcpy(&bits, &value, sizeof bits);
    ta__put_be(c, 0xcb, bits, 8);
}
void ta_bool(ta_client *c, const char *key, int value) {
    if (ta__value(c, key)) ta__put1(c, value ? 0xc3 : 0xc2);
}
void ta_nil(ta_client *c, const char *key) {
    if (ta__value(c, key)) ta__put1(c, 0xc0);
}
void ta_map_begin(ta_client *c, const char *key) {
    if (ta__value(c, key)) ta__open_container(c, 0xde);
}
void ta_map_end(ta_client *c) {
    if (c->ev_res >= 0 && c->depth > 1) ta__close_container(c);
}
void ta_array_begin(ta_client *c, const char *key) {
    if (ta__value(c, key)) ta__open_container(c, 0xdc);
}
void ta_array_end(ta_client *c) { ta_map_end(c); }

/* ---------------------------------------------------------------- the buffer */

static size_t ta__header_cost(int r) { /* 0x92, the tag as a str, an array32 header */
    return 1 + 1 + strlen(ta__resources[r]) + 5;
}

static void ta__hold(ta_client *c, const unsigned char *data, size_t len, uint32_t events) {
    ta__held *h = (ta__held *)malloc(sizeof(ta__held) + len);
    if (!h) {
        c->st.dropped += events;
        c->st.no_memory += events;
        return;
    }
    h->next = NULL;
    h->len = len;
    h->events = events;
    memcpy(h->data, data, len);
    if (c->held_tail) c->held_tail->next = h;
    else c->held_head = h;
    c->held_tail = h;
    c->held_bytes += len;
    c->held_events += events;
    while (c->held_bytes > c->opt.max_buffer && c->held_head != c->held_tail) {
        ta__held *old = c->held_head;
        c->held_head = old->next;
        c->held_bytes -= old->len;
        c->held_events -= old->events;
        ta__drop(c, old->events, TA__FULL);
        free(old);
    }
}

/* Sends held datagrams in order until one will not go; 1 when none is left. */
static int ta__pump(ta_client *c) {
    while (c->held_head) {
        ta__held *h = c->held_head;
        int why = ta__transmit(c, h->data, h->len);
        if (why == TA__FULL) return 0;
        if (why == TA__SENT) c->st.sent += h->events;
        else ta__drop(c, h->events, why);
        c->held_head = h->next;
        if (!c->held_head) c->held_tail = NULL;
        c->held_bytes -= h->len;
        c->held_events -= h->events;
        free(h);
    }
    return 1;
}

/* The datagram being built into c->seal; the buffer is emptied. Returns its length. */
static size_t ta__seal(ta_client *c, uint32_t *events) {
    size_t n = 0;
    int r;
    for (r = 0; r < TA__NRES; r++) {
        ta__res *res = &c->res[r];
        size_t tag = strlen(ta__resources[r]);
        uint32_t k = res->events;
        if (!k) continue;
        c->seal[n++] = 0x92;
        c->seal[n++] = (unsigned char)(0xa0 | tag);
        memcpy(c->seal + n, ta__resources[r], tag);
        n += tag;
        c->seal[n++] = 0xdd;
        c->seal[n++] = (unsigned char)(k >> 24);
        c->seal[n++] = (unsigned char)(k >> 16);
        c->seal[n++] = (unsigned char)(k >> 8);
        c->seal[n++] = (unsigned char)k;
        memcpy(c->seal + n, res->buf, res->len);
        n += res->len;
        res->len = 0;
        res->events = 0;
    }
    *events = c->pending_events;
    c->pending_bytes = 0;
    c->pending_events = 0;
    c->flush_at = 1e300;
    return n;
}

/* Seal the datagram being built and send it, or hold it behind what is held. Returns 1 when
 * it left (or was dropped for good), 0 when it is held. */
static int ta__ship(ta_client *c) {
    uint32_t events;
    size_t len;
    int why;
    if (!c->pending_events) return 1;
    len = ta__seal(c, &events);
    if (c->held_head) ta__pump(c); /* the queue may have room again: older datagrams first */
    if (!c->held_head) {
        why = ta__transmit(c, c->seal, len);
        if (why == TA__SENT) { c->st.sent += events; return 1; }
        if (why != TA__FULL) { ta__drop(c, events, why); return 1; }
    }
    ta__hold(c, c->seal, len, events);
    return 0;
}

static void ta__reset(ta_client *c) { /* a forked child: start over */
    int r;
    ta__held *h = c->held_head;
    while (h) {
        ta__held *next = h->next;
        free(h);
        h = next;
    }
    c->held_head = c->held_tail = NULL;
    c->held_bytes = 0;
    c->held_events = 0;
    for (r = 0; r < TA__NRES; r++) c->res[r].len = c->res[r].events = 0;
    c->pending_bytes = 0;
    c->pending_events = 0;
    c->flush_at = 1e300;
    memset(&c->st, 0, sizeof c->st);
    ta__disconnect(c);
    c->retry_at = 0;
    c->fork_generation = ta__generation;
}

/* ---------------------------------------------------------------- the API */

ta_client *ta_open(const ta_options *options) {
    ta_client *c = (ta_client *)calloc(1, sizeof *c);
    if (!c) return NULL;
    if (options) c->opt = *options;
    if (!c->opt.max_datagram || c->opt.max_datagram > TA__AGENT_MAX)
        c->opt.max_datagram = c->opt.max_datagram ? TA__AGENT_MAX : 32768;
    if (!c->opt.max_buffer) c->opt.max_buffer = (size_t)8 << 20;
    if (c->opt.flush_interval == 0) c->opt.flush_interval = 0.1;
    if (c->opt.reconnect_interval <= 0) c->opt.reconnect_interval = 1.0;
    if (c->opt.socket_path) snprintf(c->path, sizeof c->path, "%s", c->opt.socket_path);
    else ta__find_socket(c->path, sizeof c->path);
    c->opt.socket_path = c->path;
    c->ev = (unsigned char *)malloc(TA__AGENT_MAX);
    c->seal = (unsigned char *)malloc(TA__AGENT_MAX + TA__NRES * 32);
    if (!c->ev || !c->seal) {
        free(c->ev);
        free(c->seal);
        free(c);
        return NULL;
    }
    c->fd = -1;
    c->ev_res = -1;
    c->flush_at = 1e300;
#ifndef TRAITS_AGENT_NO_ATFORK
    pthread_once(&ta__atfork_once, ta__register_atfork);
#endif
    c->fork_generation = ta__generation;
    (void)ta__connect(c);
    return c;
}

static int ta__resolve(const char *name) {
    char base[32];
    const char *dot = strrchr(name, '.');
    size_t i, n;
    int r;
    if (dot) name = dot + 1;
    n = strlen(name);
    if (n == 0 || n >= sizeof base) return -1;
    for (i = 0; i < n; i++) {
        char ch = name[i];
        if (ch == '-') ch = '_';
        else if (ch >= 'A' && ch <= 'Z') ch = (char)(ch - 'A' + 'a');
        base[i] = ch;
    }
    base[n] = '\0';
    if (strcmp(base, "users") == 0) return 1; /* the logins payload key */
    for (r = 0; r < TA__NRES; r++)
        if (strcmp(base, ta__resources[r]) == 0) return r;
    return -1;
}

int ta_begin(ta_client *c, const char *resource, double t) {
    int r = resource ? ta__resolve(resource) : -1;
    if (c->fork_generation != ta__generation) ta__reset(c);
    c->ev_len = 0;
    c->ev_overflow = 0;
    c->depth = 0;
    if (r < 0) {
        c->ev_res = -2;
        return 0;
    }
    c->ev_res = r;
    ta__put1(c, 0x92);
    if (t <= 0) {
        ta__put_int(c, (int64_t)time(NULL));
    } else {
        double whole = (double)(int64_t)t; /* t > 0: truncation is floor */
        uint32_t ns = (uint32_t)((t - whole) * 1e9 + 0.5);
        if (ns >= 1000000000u || whole >= 4294967296.0) {
            ta__put_int(c, (int64_t)(whole + (ns >= 1000000000u)));
        } else if (ns == 0) {
            ta__put_int(c, (int64_t)whole);
        } else { /* EventTime: fixext8, type 0, seconds and nanoseconds big-endian */
            unsigned char b[10];
            uint32_t s = (uint32_t)whole;
            b[0] = 0xd7; b[1] = 0x00;
            b[2] = (unsigned char)(s >> 24); b[3] = (unsigned char)(s >> 16);
            b[4] = (unsigned char)(s >> 8); b[5] = (unsigned char)s;
            b[6] = (unsigned char)(ns >> 24); b[7] = (unsigned char)(ns >> 16);
            b[8] = (unsigned char)(ns >> 8); b[9] = (unsigned char)ns;
            ta__put(c, b, sizeof b);
        }
    }
    ta__open_container(c, 0xde);
    return 1;
}

int ta_end(ta_client *c) {
    int r = c->ev_res;
    ta__res *res;
    size_t cost;
    double now;
    c->ev_res = -1;
    if (r == -2) {
        c->st.dropped++;
        c->st.unknown_resource++;
        return 0;
    }
    if (r < 0) return 0; /* no event begun */
    while (c->depth > 0) ta__close_container(c);
    res = &c->res[r];
    cost = c->ev_len + (res->events ? 0 : ta__header_cost(r));
    if (c->ev_overflow || c->ev_len + ta__header_cost(r) > TA__AGENT_MAX) {
        c->st.dropped++;
        c->st.too_large++;
        return 0;
    }
    if (c->pending_events && c->pending_bytes + cost > c->opt.max_datagram) {
        ta__ship(c);
        cost = c->ev_len + ta__header_cost(r);
    }
    if (!res->buf) {
        res->buf = (unsigned char *)malloc(TA__AGENT_MAX);
        if (!res->buf) {
            c->st.dropped++;
            c->st.no_memory++;
            return 0;
        }
    }
    memcpy(res->buf + res->len, c->ev, c->ev_len);
    res->len += c->ev_len;
    res->events++;
    c->pending_bytes += cost;
    c->pending_events++;
    now = ta__monotonic();
    if (c->pending_events == 1)
        c->flush_at = now + (c->opt.flush_interval > 0 ? c->opt.flush_interval : 0);
    if (c->pending_bytes >= c->opt.max_datagram) {
        ta__ship(c);
    } else if (now >= c->flush_at && ta__pump(c)) {
        ta__ship(c); /* due, and the queue has room: else keep packing until it has */
    }
    return 1;
}

int ta_tick(ta_client *c) {
    if (c->fork_generation != ta__generation) ta__reset(c);
    if (!ta__pump(c)) return 0;
    if (c->pending_events && ta__monotonic() >= c->flush_at) return ta__ship(c);
    return c->pending_events == 0;
}

int ta_flush(ta_client *c) {
    if (c->fork_generation != ta__generation) ta__reset(c);
    if (!ta__pump(c)) {
        ta__ship(c); /* seal behind the held ones, keeping order */
        return 0;
    }
    return ta__ship(c) && !c->held_head;
}

void ta_get_stats(const ta_client *c, ta_stats *out) {
    *out = c->st;
    out->pending = c->pending_events + c->held_events;
}

const char *ta_socket_path(const ta_client *c) { return c->path; }

void ta_close(ta_client *c, int timeout_ms, ta_stats *final_stats) {
    double deadline;
    int r;
    if (!c) return;
    if (c->fork_generation != ta__generation) ta__reset(c);
    deadline = ta__monotonic() + (timeout_ms < 0 ? 1.0 : timeout_ms / 1000.0);
    ta_flush(c);
    while (c->held_head && c->fd >= 0) {
        struct pollfd p;
        double left = deadline - ta__monotonic();
        if (left <= 0) break;
        p.fd = c->fd;
        p.events = POLLOUT;
        p.revents = 0;
        (void)poll(&p, 1, (int)(left * 1000) + 1);
        ta__pump(c);
    }
    while (c->held_head) { /* what the agent did not take in time */
        ta__held *h = c->held_head;
        c->held_head = h->next;
        ta__drop(c, h->events, TA__FULL);
        free(h);
    }
    c->held_tail = NULL;
    c->held_bytes = 0;
    c->held_events = 0;
    if (c->pending_events) { /* the last datagram, sealed behind held ones that were dropped */
        uint32_t events;
        (void)ta__seal(c, &events);
        ta__drop(c, events, TA__FULL);
    }
    if (final_stats) ta_get_stats(c, final_stats);
    ta__disconnect(c);
    for (r = 0; r < TA__NRES; r++) free(c->res[r].buf);
    free(c->ev);
    free(c->seal);
    free(c);
}

int ta_level_up(ta_client *c, const char *user_id, int64_t level) {
    ta_begin(c, "level_ups", 0);
    ta_str(c, "user_id", user_id);
    ta_int(c, "level", level);
    return ta_end(c);
}

int ta_action(ta_client *c, const char *user_id, const char *action_id, const char *action_name) {
    ta_begin(c, "actions", 0);
    ta_str(c, "user_id", user_id);
    ta_str(c, "action_id", action_id);
    ta_str(c, "action_name", action_name);
    return ta_end(c);
}

int ta_purchase(ta_client *c, const char *user_id, const char *item_id, int64_t count,
                double price) {
    ta_begin(c, "purchases", 0);
    ta_str(c, "user_id", user_id);
    ta_str(c, "item_id", item_id);
    ta_int(c, "count", count);
    ta_double(c, "price", price);
    return ta_end(c);
}

int ta_virtual_purchase(ta_client *c, const char *user_id, const char *item_id, int64_t count,
                        double virtual_price, const char *currency) {
    ta_begin(c, "virtual_purchases", 0);
    ta_str(c, "user_id", user_id);
    ta_str(c, "item_id", item_id);
    ta_int(c, "count", count);
    ta_double(c, "virtual_price", virtual_price);
    ta_str(c, "currency", currency);
    return ta_end(c);
}

#ifdef __cplusplus
}
#endif
#endif /* TRAITS_AGENT_IMPLEMENTED */
#endif /* TRAITS_AGENT_IMPLEMENTATION */
