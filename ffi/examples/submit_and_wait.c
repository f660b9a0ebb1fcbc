/*
 * submit_and_wait.c: submit `sh -c 'echo hi'` to picloud, wait for it, and
 * print its exit status.
 *
 * Build (from the workspace, after `cargo build`):
 *
 *     cc -I ffi/include ffi/examples/submit_and_wait.c -L target/debug -lpicloud \
 *        -Wl,-rpath,"$PWD/target/debug" -o submit_and_wait
 *
 * Run it where `qsub` would find the server (PICLOUD_DIR, PICLOUD_SERVER or
 * ~/.picloud), or give the address as the first argument: a state directory,
 * a server socket or host:port. The job's output goes to hello.oSEQ in the
 * current directory, as qsub's would.
 *
 * The tests build and run this program (tests/tests/ffi.rs).
 */

#include <inttypes.h>
#include <stdio.h>

#include "picloud.h"

/* Prints what failed, with the code's name and libpicloud's message. */
static int fail(const char *what, int code) {
    fprintf(stderr, "%s failed: %s: %s\n", what, picloud_error_name(code), picloud_last_error());
    return 1;
}

int main(int argc, char **argv) {
    const char *address = argc > 1 ? argv[1] : NULL;
    picloud_client *client = NULL;
    int rc = picloud_client_connect(address, &client);
    if (rc != PICLOUD_OK) {
        return fail("picloud_client_connect", rc);
    }

    const char *command[] = {"sh", "-c", "echo hi"};
    picloud_job_options options = {0}; /* zero is every field's default */
    options.struct_size = sizeof options;
    options.name = "hello";
    uint64_t seq = 0;
    char id[256];
    rc = picloud_client_submit_command(client, command, 3, &options, &seq, id, sizeof id);
    if (rc != PICLOUD_OK) {
        picloud_client_free(client);
        return fail("picloud_client_submit_command", rc);
    }
    printf("submitted %s (sequence number %" PRIu64 ")\n", id, seq);

    rc = picloud_client_wait(client, &seq, 1, 60 * 1000, PICLOUD_WAIT_ALL, NULL);
    if (rc != PICLOUD_OK) {
        picloud_client_free(client);
        return fail("picloud_client_wait", rc);
    }

    picloud_task_status status = {0};
    status.struct_size = sizeof status;
    rc = picloud_client_status(client, seq, -1, &status);
    picloud_client_free(client);
    if (rc != PICLOUD_OK) {
        return fail("picloud_client_status", rc);
    }
    if (!status.has_exit_status) {
        fprintf(stderr, "job %s has no exit status after the wait\n", id);
        return 1;
    }
    printf("job %s ended with exit status %d\n", id, status.exit_status);
    return status.exit_status == 0 ? 0 : 2;
}
