/* The child every supervisor runs in the benchmarks: on start it appends
 * "PID SECONDS.NANOSECONDS" (CLOCK_REALTIME) to the file named by argv[1],
 * in one write(2), tells a notification fd it is ready when argv[2] names
 * one (s6), and sleeps until killed. Static, so no loader time is measured. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (argc > 1) {
        char line[64];
        int n = snprintf(line, sizeof line, "%d %lld.%09ld\n", (int)getpid(),
                         (long long)now.tv_sec, now.tv_nsec);
        int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            (void)write(fd, line, (size_t)n);
            close(fd);
        }
    }
    if (argc > 2) {
        int notify = atoi(argv[2]);
        (void)write(notify, "\n", 1);
        close(notify);
    }
    for (;;) pause();
}
