/*
 * bad_input.c: libpicloud given bad input from C, against a running cluster.
 *
 * Usage: bad_input STATE_DIR   (the directory of a running `picloud up`)
 *
 * Every check calls one function the wrong way (NULL pointers, freed,
 * garbage and foreign handles, wrong struct sizes, too-small buffers, unknown
 * jobs, bad modes, timeouts, segments that do not exist) and expects its
 * error code and a non-empty picloud_last_error(); a few calls that must
 * succeed are checked too, to reach the states the bad ones need. It prints
 * each failed check and a final "N passed, M failed" line, and exits 1 if any
 * check failed. tests/tests/ffi.rs runs it under valgrind (or, without
 * valgrind, built with AddressSanitizer), so reading memory it should not
 * fails the test even when every code is right.
 */

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "picloud.h"

static int passed = 0;
static int failed = 0;

/* Expects `call` to return `want`; for an error, also a message. */
#define EXPECT(want, call)                                                                              \
    do {                                                                                                \
        int got_ = (call);                                                                              \
        const char *msg_ = picloud_last_error();                                                        \
        if (got_ != (want)) {                                                                           \
            fprintf(stderr, "FAIL line %d: %s\n  returned %s (%d), expected %s; last error: %s\n",     \
                    __LINE__, #call, picloud_error_name(got_), got_, picloud_error_name(want), msg_);   \
            failed++;                                                                                   \
        } else if ((want) != PICLOUD_OK && (msg_ == NULL || msg_[0] == '\0')) {                         \
            fprintf(stderr, "FAIL line %d: %s\n  returned %s without a message\n", __LINE__, #call,     \
                    picloud_error_name(got_));                                                          \
            failed++;                                                                                   \
        } else {                                                                                        \
            passed++;                                                                                   \
        }                                                                                               \
    } while (0)

/* Expects a condition. */
#define CHECK(cond)                                                           \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "FAIL line %d: %s\n", __LINE__, #cond);           \
            failed++;                                                         \
        } else {                                                              \
            passed++;                                                         \
        }                                                                     \
    } while (0)

/* Expects the last error to mention `text`. */
#define MENTIONS(text) CHECK(strstr(picloud_last_error(), (text)) != NULL)

/* A failing call from a pthread_key destructor, which runs after the
 * thread's thread-locals are destroyed: an error code, not an abort. */
static pthread_key_t late_key;
static int late_code = 1;

static void late_call(void *handle) {
    late_code = picloud_client_free((picloud_client *)handle);
    (void)picloud_last_error();
}

static void *thread_with_a_late_call(void *unused) {
    (void)unused;
    picloud_client_free((picloud_client *)0x2000); /* this thread's last error is set */
    pthread_setspecific(late_key, (void *)0x1000);
    return NULL;
}

static void calls_after_thread_locals_are_gone(void) {
    pthread_t t;
    CHECK(pthread_key_create(&late_key, late_call) == 0);
    CHECK(pthread_create(&t, NULL, thread_with_a_late_call, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(late_code == PICLOUD_ERR_INVALID_HANDLE);
    pthread_key_delete(late_key);
}

static void static_functions(void) {
    CHECK(strcmp(picloud_error_name(PICLOUD_ERR_TIMEOUT), "PICLOUD_ERR_TIMEOUT") == 0);
    CHECK(strcmp(picloud_error_name(PICLOUD_OK), "PICLOUD_OK") == 0);
    CHECK(strcmp(picloud_error_name(42), "unknown") == 0);
    CHECK(picloud_version() != NULL && picloud_version()[0] != '\0');
}

static void connecting(const char *dir) {
    picloud_client *c = NULL;
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_connect(dir, NULL));
    EXPECT(PICLOUD_ERR_CONNECT, picloud_client_connect("/nonexistent/picloud/server.sock", &c));
    MENTIONS("/nonexistent/picloud/server.sock");
    CHECK(c == NULL); /* untouched on failure */
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_connect("", &c));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_connect("\xff\xfe", &c));
    MENTIONS("UTF-8");
    picloud_agent *a = NULL;
    EXPECT(PICLOUD_ERR_CONNECT, picloud_agent_connect("/nonexistent/picloud", &a));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_agent_connect(dir, NULL));
    /* Freeing NULL does nothing. */
    EXPECT(PICLOUD_OK, picloud_client_free(NULL));
    EXPECT(PICLOUD_OK, picloud_results_free(NULL));
    EXPECT(PICLOUD_OK, picloud_agent_free(NULL));
    EXPECT(PICLOUD_OK, picloud_segment_free(NULL));
}

static void handles(picloud_client *client, const char *dir) {
    const char *argv[] = {"true"};
    uint64_t seq = 0;
    /* NULL, freed, garbage and foreign handles. */
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_submit_command(NULL, argv, 1, NULL, &seq, NULL, 0));
    picloud_client *freed = NULL;
    EXPECT(PICLOUD_OK, picloud_client_connect(dir, &freed));
    EXPECT(PICLOUD_OK, picloud_client_free(freed));
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_client_submit_command(freed, argv, 1, NULL, &seq, NULL, 0));
    MENTIONS("picloud_client");
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_client_free(freed)); /* double free */
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_client_cancel(freed, 1, -1));
    int not_a_handle = 7;
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_client_cancel((picloud_client *)&not_a_handle, 1, -1));
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_client_free((picloud_client *)(uintptr_t)0x1000));
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_results_free((picloud_results *)client)); /* wrong type */
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_segment_free((picloud_segment *)client));
    size_t len = 0;
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_results_len((const picloud_results *)client, &len));
    /* The client passed as the wrong type is still fine. */
    EXPECT(PICLOUD_OK, picloud_client_submit_command(client, argv, 1, NULL, &seq, NULL, 0));
}

static void submitting(picloud_client *client) {
    const char *argv[] = {"sh", "-c", "exit 3"};
    uint64_t seq = 0, before = 0, after = 0;
    char id[256];
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_submit_command(client, NULL, 1, NULL, &seq, NULL, 0));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_submit_command(client, argv, 0, NULL, &seq, NULL, 0));
    const char *with_null[] = {"sh", NULL};
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_submit_command(client, with_null, 2, NULL, &seq, NULL, 0));
    MENTIONS("argv[1]");
    const char *not_utf8[] = {"sh", "\xc3\x28"};
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_submit_command(client, not_utf8, 2, NULL, &seq, NULL, 0));

    /* A buffer too small for the id fails before submitting anything. */
    EXPECT(PICLOUD_OK, picloud_client_submit_command(client, argv, 3, NULL, &before, id, sizeof id));
    CHECK(strchr(id, '.') != NULL);
    char small[4] = "xyz";
    EXPECT(PICLOUD_ERR_BUFFER_TOO_SMALL, picloud_client_submit_command(client, argv, 3, NULL, &seq, small, sizeof small));
    MENTIONS("nothing was submitted");
    CHECK(small[0] == '\0');
    /* A NULL id_out is allowed: the job is submitted, its seq comes back. */
    EXPECT(PICLOUD_OK, picloud_client_submit_command(client, argv, 3, NULL, &seq, NULL, 0));
    EXPECT(PICLOUD_OK, picloud_client_submit_command(client, argv, 3, NULL, &after, id, sizeof id));
    CHECK(after == before + 2); /* one for the NULL id_out submission, none for the failed one */

    /* Options: wrong size, unknown flags, bad values. */
    picloud_job_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o - 8;
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_submit_command(client, argv, 3, &o, &seq, NULL, 0));
    MENTIONS("struct_size");
    o.struct_size = sizeof o;
    o.flags = 0x80000000u;
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_submit_command(client, argv, 3, &o, &seq, NULL, 0));
    o.flags = 0;
    o.array = "9-1";
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_submit_command(client, argv, 3, &o, &seq, NULL, 0));
    o.array = "0,4294967295"; /* an index no int32_t can name */
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_submit_command(client, argv, 3, &o, &seq, NULL, 0));
    MENTIONS("2147483647");
    o.array = NULL;
    o.env_len = 2; /* with env NULL */
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_submit_command(client, argv, 3, &o, &seq, NULL, 0));
    o.env_len = 0;
    uint64_t unknown_dep = 999999;
    o.depend_on = &unknown_dep;
    o.depend_len = 1;
    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_submit_command(client, argv, 3, &o, &seq, NULL, 0));
    o.depend_len = 0;
    o.ncpus = 100000; /* more cores than any node has: the server refuses */
    EXPECT(PICLOUD_ERR_SERVER, picloud_client_submit_command(client, argv, 3, &o, &seq, NULL, 0));

    /* A Python call without arguments, and of the wrong size. */
    picloud_python_call call;
    memset(&call, 0, sizeof call);
    call.struct_size = sizeof call;
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_submit_python(client, NULL, NULL, &seq));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_submit_python(client, &call, NULL, NULL));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_submit_python(client, &call, NULL, &seq));
    MENTIONS("args_len");
    call.struct_size = 4;
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_submit_python(client, &call, NULL, &seq));
}

/* Pipelined submissions: checked at once where the library can; the server's
 * refusal comes back through the calls that name the job. */
static void pipelined(picloud_client *client, const char *dir) {
    picloud_python_call call;
    memset(&call, 0, sizeof call);
    call.struct_size = sizeof call;
    uint64_t seq = 0;
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_submit_python_async(NULL, &call, NULL, &seq));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_submit_python_async(client, NULL, NULL, &seq));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_submit_python_async(client, &call, NULL, NULL));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_submit_python_async(client, &call, NULL, &seq));
    MENTIONS("args_len");
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_flush(NULL));
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_client_flush((picloud_client *)&call));

    /* More cores than any node has: accepted here, refused by the server. */
    static const uint8_t function[] = "not a pickle";
    static const uint8_t args[] = "no arguments";
    picloud_bytes arg = {args, sizeof args};
    call.function.data = function;
    call.function.len = sizeof function;
    call.args = &arg;
    call.args_len = 1;
    picloud_job_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.ncpus = 100000;
    EXPECT(PICLOUD_OK, picloud_client_submit_python_async(client, &call, &o, &seq));
    CHECK(seq != 0);
    EXPECT(PICLOUD_OK, picloud_client_flush(client));
    picloud_task_status st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    EXPECT(PICLOUD_ERR_SERVER, picloud_client_status(client, seq, -1, &st));
    MENTIONS("was not queued");
    EXPECT(PICLOUD_ERR_SERVER, picloud_client_wait(client, &seq, 1, 0, PICLOUD_WAIT_ALL, NULL));
    MENTIONS("was not queued");
    picloud_results *r = NULL;
    EXPECT(PICLOUD_ERR_SERVER, picloud_client_results(client, seq, -1, &r));
    CHECK(r == NULL);
    EXPECT(PICLOUD_ERR_SERVER, picloud_client_cancel(client, seq, -1));

    /* The next pipelined submission gets the next number and is queued;
     * flushed, another client finds it at once. */
    uint64_t next = 0;
    o.ncpus = 1;
    o.flags = PICLOUD_JOB_HOLD;
    EXPECT(PICLOUD_OK, picloud_client_submit_python_async(client, &call, &o, &next));
    CHECK(next > seq);
    EXPECT(PICLOUD_OK, picloud_client_flush(client));
    picloud_client *other = NULL;
    EXPECT(PICLOUD_OK, picloud_client_connect(dir, &other));
    EXPECT(PICLOUD_OK, picloud_client_status(other, next, -1, &st));
    CHECK(st.state == PICLOUD_STATE_HELD);
    /* The refusal is this client's to report: the other never heard of it. */
    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_status(other, seq, -1, &st));
    EXPECT(PICLOUD_OK, picloud_client_cancel(other, next, -1));
    EXPECT(PICLOUD_OK, picloud_client_free(other));
}

static void waiting_and_status(picloud_client *client) {
    const char *sleeper[] = {"sleep", "30"};
    uint64_t seq = 0;
    EXPECT(PICLOUD_OK, picloud_client_submit_command(client, sleeper, 2, NULL, &seq, NULL, 0));
    uint8_t ended[2] = {7, 7};
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_wait(client, &seq, 1, -1, 7, NULL));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_wait(client, &seq, 1, -5, PICLOUD_WAIT_ALL, NULL));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_wait(client, NULL, 1, 0, PICLOUD_WAIT_ALL, NULL));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_wait(client, &seq, 0, 0, PICLOUD_WAIT_ANY, NULL));
    EXPECT(PICLOUD_OK, picloud_client_wait(client, NULL, 0, -1, PICLOUD_WAIT_ALL, NULL));
    uint64_t unknown = 999999;
    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_wait(client, &unknown, 1, 100, PICLOUD_WAIT_ALL, NULL));
    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_wait(client, &unknown, 1, 100, PICLOUD_WAIT_ANY, NULL));
    EXPECT(PICLOUD_ERR_TIMEOUT, picloud_client_wait(client, &seq, 1, 100, PICLOUD_WAIT_ALL, ended));
    CHECK(ended[0] == 0 && ended[1] == 7);
    EXPECT(PICLOUD_ERR_TIMEOUT, picloud_client_wait(client, &seq, 1, 100, PICLOUD_WAIT_ANY, ended));
    CHECK(ended[0] == 0);

    picloud_task_status st;
    memset(&st, 0, sizeof st);
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_status(client, seq, -1, NULL));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_status(client, seq, -1, &st)); /* struct_size 0 */
    st.struct_size = sizeof st;
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_status(client, seq, -2, &st));
    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_status(client, unknown, -1, &st));
    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_status(client, seq, 3, &st)); /* not an array */
    EXPECT(PICLOUD_OK, picloud_client_status(client, seq, -1, &st));
    CHECK(!st.has_exit_status && st.state != PICLOUD_STATE_FINISHED);

    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_cancel(client, unknown, -1));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_cancel(client, seq, -3));
    EXPECT(PICLOUD_OK, picloud_client_cancel(client, seq, -1));
    EXPECT(PICLOUD_OK, picloud_client_wait(client, &seq, 1, 30000, PICLOUD_WAIT_ANY, ended));
    CHECK(ended[0] == 1);
    EXPECT(PICLOUD_OK, picloud_client_cancel(client, seq, -1)); /* already ended: nothing to do */
    EXPECT(PICLOUD_OK, picloud_client_status(client, seq, -1, &st));
    CHECK(st.state == PICLOUD_STATE_FINISHED && st.has_exit_status && st.exit_status == 265);
}

static void results(picloud_client *client) {
    const char *argv[] = {"true"};
    uint64_t seq = 0;
    EXPECT(PICLOUD_OK, picloud_client_submit_command(client, argv, 1, NULL, &seq, NULL, 0));
    EXPECT(PICLOUD_OK, picloud_client_wait(client, &seq, 1, 30000, PICLOUD_WAIT_ALL, NULL));
    picloud_results *r = NULL;
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_results(client, seq, -1, NULL));
    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_results(client, 999999, -1, &r));
    EXPECT(PICLOUD_OK, picloud_client_results(client, seq, -1, &r));
    size_t len = 0;
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_results_len(r, NULL));
    EXPECT(PICLOUD_OK, picloud_results_len(r, &len));
    CHECK(len == 1);
    picloud_task_result t;
    memset(&t, 0, sizeof t);
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_results_get(r, 0, &t)); /* struct_size 0 */
    t.struct_size = sizeof t;
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_results_get(r, 1, &t)); /* out of range */
    MENTIONS("out of range");
    EXPECT(PICLOUD_OK, picloud_results_get(r, 0, &t));
    /* A command job: an exit status, no Python outcome, empty buffers. */
    CHECK(t.seq == seq && t.index == -1 && t.has_exit_status && t.exit_status == 0);
    CHECK(t.outcome == PICLOUD_OUTCOME_NONE && t.value_len == 0 && t.value != NULL && t.error[0] == '\0');
    CHECK(t.id_len == strlen(t.id) && t.segments_len == 0);
    const char *name = NULL;
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_results_segment(r, 0, 0, &name));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_results_segment(r, 0, 0, NULL));
    EXPECT(PICLOUD_OK, picloud_results_free(r));
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_results_len(r, &len)); /* freed */
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_results_free(r));

    /* A wait that brings the results along. */
    uint8_t ended[2] = {7, 7};
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_wait_results(client, &seq, 1, 0, PICLOUD_WAIT_ALL, NULL, NULL));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_wait_results(client, NULL, 1, 0, PICLOUD_WAIT_ALL, NULL, &r));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_wait_results(client, &seq, 1, 0, 9, NULL, &r));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_wait_results(client, &seq, 0, 0, PICLOUD_WAIT_ANY, NULL, &r));
    EXPECT(PICLOUD_ERR_INVALID_HANDLE,
           picloud_client_wait_results((picloud_client *)ended, &seq, 1, 0, PICLOUD_WAIT_ALL, NULL, &r));
    uint64_t unknown = 999999;
    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_wait_results(client, &unknown, 1, 0, PICLOUD_WAIT_ALL, NULL, &r));
    r = NULL;
    EXPECT(PICLOUD_OK, picloud_client_wait_results(client, &seq, 1, 1000, PICLOUD_WAIT_ANY, ended, &r));
    CHECK(ended[0] == 1 && ended[1] == 7 && r != NULL);
    EXPECT(PICLOUD_OK, picloud_results_len(r, &len));
    CHECK(len == 1);
    EXPECT(PICLOUD_OK, picloud_results_get(r, 0, &t));
    CHECK(t.seq == seq && t.has_exit_status && t.exit_status == 0);
    EXPECT(PICLOUD_OK, picloud_results_free(r));
    /* Nothing to wait for: at once, and no results. */
    EXPECT(PICLOUD_OK, picloud_client_wait_results(client, NULL, 0, -1, PICLOUD_WAIT_ALL, NULL, &r));
    EXPECT(PICLOUD_OK, picloud_results_len(r, &len));
    CHECK(len == 0);
    EXPECT(PICLOUD_OK, picloud_results_free(r));
    /* Waiting for one job or task, with its results. */
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_client_wait_task(client, seq, -1, 0, NULL));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_wait_task(client, seq, -2, 0, &r));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_client_wait_task(client, seq, -1, -5, &r));
    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_wait_task(client, unknown, -1, 0, &r));
    EXPECT(PICLOUD_ERR_UNKNOWN_JOB, picloud_client_wait_task(client, seq, 4, 0, &r)); /* not an array */
    r = NULL;
    EXPECT(PICLOUD_OK, picloud_client_wait_task(client, seq, -1, 1000, &r));
    EXPECT(PICLOUD_OK, picloud_results_len(r, &len));
    CHECK(len == 1);
    EXPECT(PICLOUD_OK, picloud_results_get(r, 0, &t));
    CHECK(t.seq == seq && t.has_exit_status && t.exit_status == 0);
    EXPECT(PICLOUD_OK, picloud_results_free(r));
    /* A timeout leaves *out alone and says which had ended. */
    const char *sleeper[] = {"sleep", "30"};
    uint64_t pair[2] = {seq, 0};
    EXPECT(PICLOUD_OK, picloud_client_submit_command(client, sleeper, 2, NULL, &pair[1], NULL, 0));
    r = NULL;
    EXPECT(PICLOUD_ERR_TIMEOUT, picloud_client_wait_results(client, pair, 2, 100, PICLOUD_WAIT_ALL, ended, &r));
    CHECK(r == NULL && ended[0] == 1 && ended[1] == 0);
    EXPECT(PICLOUD_OK, picloud_client_wait_results(client, pair, 2, 5000, PICLOUD_WAIT_ANY, ended, &r));
    CHECK(ended[0] == 1 && ended[1] == 0);
    EXPECT(PICLOUD_OK, picloud_results_len(r, &len));
    CHECK(len == 1);
    EXPECT(PICLOUD_OK, picloud_results_free(r));
    r = NULL;
    EXPECT(PICLOUD_ERR_TIMEOUT, picloud_client_wait_task(client, pair[1], -1, 100, &r));
    CHECK(r == NULL);
    EXPECT(PICLOUD_OK, picloud_client_cancel(client, pair[1], -1));
    EXPECT(PICLOUD_OK, picloud_client_wait_task(client, pair[1], -1, 30000, &r));
    EXPECT(PICLOUD_OK, picloud_results_get(r, 0, &t));
    CHECK(t.has_exit_status && t.exit_status == 265);
    EXPECT(PICLOUD_OK, picloud_results_free(r));
}

static void segments(const char *dir) {
    picloud_agent *agent = NULL;
    EXPECT(PICLOUD_OK, picloud_agent_connect(dir, &agent));
    picloud_segment *seg = NULL, *view = NULL;
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_segment_create(agent, 0, &seg));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_segment_create(agent, 4096, NULL));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_segment_create(NULL, 4096, &seg));
    /* Past every quota: the agent refuses. */
    EXPECT(PICLOUD_ERR_SERVER, picloud_segment_create(agent, UINT64_C(1) << 62, &seg));
    EXPECT(PICLOUD_OK, picloud_segment_create(agent, 4096, &seg));

    void *data = NULL;
    uint64_t len = 0;
    int writable = -1;
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_segment_data(seg, NULL, &len, NULL));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_segment_data(seg, &data, NULL, NULL));
    EXPECT(PICLOUD_OK, picloud_segment_data(seg, &data, &len, &writable));
    CHECK(data != NULL && len == 4096 && writable == 1);
    memset(data, 'x', (size_t)len);
    memcpy(data, "hello", 5);

    char tiny[2] = "z";
    EXPECT(PICLOUD_ERR_BUFFER_TOO_SMALL, picloud_segment_name(seg, tiny, sizeof tiny));
    CHECK(tiny[0] == '\0');
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_segment_name(seg, NULL, 10));
    char name[128];
    EXPECT(PICLOUD_OK, picloud_segment_name(seg, name, sizeof name));

    /* The same segment mapped again, read-only, sees the bytes. */
    EXPECT(PICLOUD_OK, picloud_segment_map(agent, name, &view));
    void *vdata = NULL;
    uint64_t vlen = 0;
    EXPECT(PICLOUD_OK, picloud_segment_data(view, &vdata, &vlen, &writable));
    CHECK(vlen == 4096 && writable == 0 && memcmp(vdata, "hellox", 6) == 0);
    /* Both name one file, which the agent placed. */
    char path[4096], vpath[4096];
    EXPECT(PICLOUD_ERR_BUFFER_TOO_SMALL, picloud_segment_path(seg, tiny, sizeof tiny));
    CHECK(tiny[0] == '\0');
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_segment_path(view, NULL, 10));
    EXPECT(PICLOUD_OK, picloud_segment_path(seg, path, sizeof path));
    EXPECT(PICLOUD_OK, picloud_segment_path(view, vpath, sizeof vpath));
    CHECK(strcmp(path, vpath) == 0 && strstr(path, name) != NULL && path[0] == '/');

    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_segment_map(agent, "../../etc/passwd", &view));
    EXPECT(PICLOUD_ERR_INVALID_ARGUMENT, picloud_segment_map(agent, "", &view));
    EXPECT(PICLOUD_ERR_NULL_POINTER, picloud_segment_map(agent, NULL, &view));
    picloud_segment *none = NULL;
    EXPECT(PICLOUD_ERR_SERVER, picloud_segment_map(agent, "picloud-00000000-999999", &none));
    CHECK(none == NULL);

    /* The agent handle may go first; its segments stay usable. */
    EXPECT(PICLOUD_OK, picloud_agent_free(agent));
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_segment_create(agent, 4096, &none));
    EXPECT(PICLOUD_OK, picloud_segment_free(seg));
    EXPECT(PICLOUD_OK, picloud_segment_data(view, &vdata, &vlen, NULL));
    CHECK(memcmp(vdata, "hello", 5) == 0);
    EXPECT(PICLOUD_OK, picloud_segment_free(view));
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_segment_free(view));
    EXPECT(PICLOUD_ERR_INVALID_HANDLE, picloud_segment_data(seg, &data, &len, NULL));
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s STATE_DIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    static_functions();
    calls_after_thread_locals_are_gone();
    connecting(dir);
    picloud_client *client = NULL;
    EXPECT(PICLOUD_OK, picloud_client_connect(dir, &client));
    if (client == NULL) {
        fprintf(stderr, "cannot go on without a client: %s\n", picloud_last_error());
        return 1;
    }
    handles(client, dir);
    submitting(client);
    pipelined(client, dir);
    waiting_and_status(client);
    results(client);
    segments(dir);
    EXPECT(PICLOUD_OK, picloud_client_free(client));
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
