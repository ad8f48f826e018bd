// ollama-like: a small server that starts its GPU helpers the way ollama does, so that the
// "runner loses LD_PRELOAD" failure can be reproduced without a GPU.
//
//	ollama serve [--once] [--runners-forever] [--listen 127.0.0.1:11434]
//	ollama runner --ollama-engine --port N
//
// serve runs GPU discovery like ollama's bootstrap: it starts itself (os.Executable()) as
// "runner --ollama-engine --port N" with os/exec, two runners one after the other, then two at once
// from goroutines. Each runner's environment is os.Environ() without LD_PRELOAD and without any
// VGPU_TEST_* variable (a program that strips the preload strips the shim's settings too), with
// LD_LIBRARY_PATH pointing at OLLAMA_LIBRARY_PATH, or else at the directory holding this
// executable, where libcuda.so.1 is expected. The parent polls http://127.0.0.1:N/info every
// 10 ms until the runner answers, reads its device count, kills it and waits for it. It logs
// "runner pid=P port=N count=C" per runner and then "initial_count=N" (the first runner's count).
//
// With --once it exits 0 right after discovery. Otherwise it serves "/" on --listen until SIGTERM
// or SIGINT, then exits 0. With --runners-forever (soak tests) it keeps starting and killing
// runners until SIGTERM or SIGINT, then logs "runners=N" and exits 0.
//
// runner dlopen()s libcuda.so.1, calls cuInit and cuDeviceGetCount through dlsym, and serves
// {"count": C} on http://127.0.0.1:N/info.
package main

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdio.h>

typedef int (*cu_init_fn)(unsigned int);
typedef int (*cu_count_fn)(int *);

static int cuda_device_count(char *err, int errlen)
{
	void *h = dlopen("libcuda.so.1", RTLD_NOW);
	cu_init_fn init;
	cu_count_fn count_fn;
	int count = -1;
	int rc;

	if (!h) {
		snprintf(err, errlen, "dlopen libcuda.so.1: %s", dlerror());
		return -1;
	}
	init = (cu_init_fn)dlsym(h, "cuInit");
	count_fn = (cu_count_fn)dlsym(h, "cuDeviceGetCount");
	if (!init || !count_fn) {
		snprintf(err, errlen, "libcuda.so.1 lacks cuInit or cuDeviceGetCount");
		return -1;
	}
	if ((rc = init(0)) != 0) {
		snprintf(err, errlen, "cuInit: error %d", rc);
		return -1;
	}
	if ((rc = count_fn(&count)) != 0) {
		snprintf(err, errlen, "cuDeviceGetCount: error %d", rc);
		return -1;
	}
	return count;
}
*/
import "C"

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

var logMu sync.Mutex

func logf(format string, args ...interface{}) {
	logMu.Lock()
	defer logMu.Unlock()
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ollama serve [--once] [--runners-forever] [--listen ADDR] | runner --port N")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		os.Exit(serve(os.Args[2:]))
	case "runner":
		os.Exit(runner(os.Args[2:]))
	default:
		fmt.Fprintf(os.Stderr, "ollama: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
}

// ---- serve ----

func serve(args []string) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	once := fs.Bool("once", false, "exit right after GPU discovery")
	forever := fs.Bool("runners-forever", false, "keep starting and killing runners until signalled")
	listen := fs.String("listen", "127.0.0.1:11434", "address to serve on")
	if err := fs.Parse(args); err != nil {
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	first, err := discover(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return 0
		}
		logf("discovery failed: %v", err)
		return 1
	}
	logf("initial_count=%d", first)

	switch {
	case *once:
		return 0
	case *forever:
		return runnersForever(ctx)
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		logf("listen %s: %v", *listen, err)
		return 1
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	srv := &http.Server{Handler: mux}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	logf("listening on %s", ln.Addr())
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		logf("serve: %v", err)
		return 1
	}
	logf("shutting down")
	return 0
}

// discover starts two runners one after the other, then two at once, like ollama's bootstrap
// discovery, and returns the device count that the first one reported.
func discover(ctx context.Context) (int, error) {
	first := -1
	for i := 0; i < 2; i++ {
		n, err := runOneRunner(ctx)
		if err != nil {
			return 0, err
		}
		if first < 0 {
			first = n
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			_, errs[i] = runOneRunner(ctx)
		}(i)
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return 0, err
		}
	}
	return first, nil
}

func runnersForever(ctx context.Context) int {
	total := 4 // the discovery runners
	for ctx.Err() == nil {
		if _, err := runOneRunner(ctx); err != nil {
			if ctx.Err() != nil {
				break
			}
			logf("runner failed: %v", err)
			return 1
		}
		total++
	}
	logf("runners=%d", total)
	return 0
}

func runnerEnv(exe string) []string {
	libDir := os.Getenv("OLLAMA_LIBRARY_PATH")
	if libDir == "" {
		libDir = filepath.Dir(exe)
	}
	ldPath := libDir
	if old := os.Getenv("LD_LIBRARY_PATH"); old != "" {
		ldPath = libDir + ":" + old
	}
	env := []string{}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "LD_PRELOAD=") || strings.HasPrefix(kv, "VGPU_TEST_") ||
			strings.HasPrefix(kv, "LD_LIBRARY_PATH=") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "LD_LIBRARY_PATH="+ldPath)
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// runOneRunner starts a runner, polls its /info every 10 ms until it answers, then kills it and
// waits for it.
func runOneRunner(ctx context.Context) (int, error) {
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	port, err := freePort()
	if err != nil {
		return 0, err
	}
	cmd := exec.Command(exe, "runner", "--ollama-engine", "--port", strconv.Itoa(port))
	cmd.Env = runnerEnv(exe)
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start runner: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	finish := func() {
		cmd.Process.Kill()
		<-exited
	}

	client := &http.Client{Timeout: 2 * time.Second}
	url := fmt.Sprintf("http://127.0.0.1:%d/info", port)
	deadline := time.Now().Add(60 * time.Second)
	ticker := time.NewTicker(10 * time.Millisecond)
	defer ticker.Stop()
	for {
		select {
		case err := <-exited:
			return 0, fmt.Errorf("runner pid=%d port=%d exited before answering: %v",
				cmd.Process.Pid, port, err)
		case <-ctx.Done():
			finish()
			return 0, ctx.Err()
		case <-ticker.C:
		}
		if time.Now().After(deadline) {
			finish()
			return 0, fmt.Errorf("runner pid=%d port=%d did not answer within 60s", cmd.Process.Pid, port)
		}
		resp, err := client.Get(url)
		if err != nil {
			continue
		}
		var info struct {
			Count int    `json:"count"`
			Error string `json:"error"`
		}
		err = json.NewDecoder(resp.Body).Decode(&info)
		resp.Body.Close()
		if err != nil {
			continue
		}
		finish()
		if info.Error != "" {
			logf("runner pid=%d port=%d count=%d error=%q", cmd.Process.Pid, port, info.Count, info.Error)
		} else {
			logf("runner pid=%d port=%d count=%d", cmd.Process.Pid, port, info.Count)
		}
		return info.Count, nil
	}
}

// ---- runner ----

func cudaDeviceCount() (int, error) {
	var buf [512]C.char
	n := C.cuda_device_count(&buf[0], C.int(len(buf)))
	if n < 0 {
		return 0, errors.New(C.GoString((*C.char)(unsafe.Pointer(&buf[0]))))
	}
	return int(n), nil
}

func runner(args []string) int {
	fs := flag.NewFlagSet("runner", flag.ContinueOnError)
	fs.Bool("ollama-engine", false, "accepted for compatibility")
	fs.String("model", "", "accepted for compatibility")
	port := fs.Int("port", 0, "port to serve /info on")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *port <= 0 {
		fmt.Fprintln(os.Stderr, "runner: --port is required")
		return 2
	}

	count, err := cudaDeviceCount()
	info := map[string]interface{}{"count": count}
	if err != nil {
		info["error"] = err.Error()
	}
	body, _ := json.Marshal(info)

	// A runner whose parent went away has nobody to answer: leave too.
	ppid := os.Getppid()
	go func() {
		for {
			time.Sleep(200 * time.Millisecond)
			if os.Getppid() != ppid {
				os.Exit(0)
			}
		}
	}()

	mux := http.NewServeMux()
	mux.HandleFunc("/info", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})
	if err := http.ListenAndServe(fmt.Sprintf("127.0.0.1:%d", *port), mux); err != nil {
		fmt.Fprintf(os.Stderr, "runner: %v\n", err)
		return 1
	}
	return 0
}
