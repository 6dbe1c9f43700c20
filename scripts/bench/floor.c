/* The floor the supervisors are measured against: `floor N CHILD ARGS...`
 * forks and execs N copies of CHILD, and re-forks one as soon as one is
 * reaped. No cgroups, no logs, no state: what a restart costs the machine
 * itself. SIGTERM takes the children with it (they share its group). */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    kill(0, SIGKILL);
}

static void start(char **child) {
    if (fork() == 0) {
        execv(child[0], child);
        _exit(127);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    setpgid(0, 0);
    signal(SIGTERM, stop);
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) start(argv + 2);
    for (;;) {
        int status;
        if (wait(&status) < 0) return 1;
        start(argv + 2);
    }
}
