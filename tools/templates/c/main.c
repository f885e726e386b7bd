// A thaw function in C, as a WASI command: main() runs in a fresh instance for every request,
// with the request on stdin and the response on stdout.
#include <stdio.h>

int main(void) {
    char request[65536];
    size_t n = fread(request, 1, sizeof request, stdin);

    // /tmp is in the VM's memory: it starts empty in every request's VM.
    FILE *f = fopen("/tmp/request.txt", "w");
    if (f == NULL) {
        perror("/tmp/request.txt");
        return 1;
    }
    fwrite(request, 1, n, f);
    fclose(f);

    f = fopen("/tmp/request.txt", "r");
    size_t saved = f == NULL ? 0 : fread(request, 1, sizeof request, f);
    if (f != NULL) {
        fclose(f);
    }
    printf("{\"bytes\": %zu, \"saved_bytes\": %zu}\n", n, saved);
    return 0;
}
