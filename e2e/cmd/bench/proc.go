package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/scenario"
)

// adminToken is the operator token the child is started with.
const adminToken = "bench-admin-token"

// buildDevstack builds the dev stack binary (all of Bulkhead in one process)
// into dir and returns its path.
func buildDevstack(ctx context.Context, root, dir string) (string, error) {
	bin := filepath.Join(dir, "bulkhead-dev")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./services/devstack")
	cmd.Dir = root
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build devstack: %w", err)
	}
	return bin, nil
}

// child is a running Bulkhead dev stack process.
type child struct {
	cmd         *exec.Cmd
	done        chan error
	IngestAddr  string
	AdminAddr   string
	MetricsAddr string
	// RouterMetrics and DelivererMetrics serve those services' /metrics.
	RouterMetrics, DelivererMetrics string
	NATSURL                         string
	LogPath                         string
}

// freePort returns a loopback port nothing listens on now.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func freeAddr() (string, error) {
	p, err := freePort()
	if err != nil {
		return "", err
	}
	return "127.0.0.1:" + strconv.Itoa(p), nil
}

// startChild starts bin with a fresh data directory under dir, tenants API
// keys, and extra environment (KEY=VALUE), and waits until its APIs answer.
func startChild(ctx context.Context, bin, dir string, tenants int, extra []string) (*child, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	natsPort, err := freePort()
	if err != nil {
		return nil, err
	}
	c := &child{LogPath: filepath.Join(dir, "bulkhead.log"), done: make(chan error, 1)}
	for _, a := range []*string{&c.IngestAddr, &c.AdminAddr, &c.MetricsAddr, &c.RouterMetrics, &c.DelivererMetrics} {
		if *a, err = freeAddr(); err != nil {
			return nil, err
		}
	}
	c.NATSURL = fmt.Sprintf("nats://127.0.0.1:%d", natsPort)
	env := append(os.Environ(),
		"BULKHEAD_DEV_DATA_DIR="+filepath.Join(dir, "data"),
		"BULKHEAD_DEV_NATS_PORT="+strconv.Itoa(natsPort),
		"BULKHEAD_DEV_LOG_LEVEL=warn",
		"BULKHEAD_INGEST_GRPC_ADDR="+c.IngestAddr,
		"BULKHEAD_MONITOR_ADMIN_ADDR="+c.AdminAddr,
		// One process: any service's metrics address serves the whole
		// process's pprof.
		"BULKHEAD_INGEST_METRICS_ADDR="+c.MetricsAddr,
		"BULKHEAD_ROUTER_METRICS_ADDR="+c.RouterMetrics,
		"BULKHEAD_DELIVERER_METRICS_ADDR="+c.DelivererMetrics,
		"BULKHEAD_MONITOR_METRICS_ADDR=",
		"BULKHEAD_INGEST_API_KEYS="+strings.Join(scenario.KeyPairs(tenants), ","),
		"BULKHEAD_MONITOR_ADMIN_TOKENS=admin:"+adminToken+":operator",
	)
	env = append(env, extra...)
	logf, err := os.Create(c.LogPath)
	if err != nil {
		return nil, err
	}
	c.cmd = exec.Command(bin)
	c.cmd.Env = env
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() {
		c.done <- c.cmd.Wait()
		logf.Close()
	}()
	return c, nil
}

// Stop asks the child to stop and waits up to 30 s before killing it.
func (c *child) Stop() error {
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return nil // already gone
	}
	select {
	case err := <-c.done:
		return err
	case <-time.After(30 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
		return errors.New("bulkhead did not stop within 30s; killed")
	}
}

// Exited reports whether the child has exited.
func (c *child) Exited() bool { return c.cmd.ProcessState != nil }

// usage is the child's CPU time (user+system) and peak resident set so far.
func (c *child) usage() (cpu float64, peakRSS int64, err error) {
	return procUsage(c.cmd.Process.Pid)
}

// procUsage reads /proc/<pid>/stat (utime, stime; USER_HZ is 100 on
// Linux) and /proc/<pid>/status (VmHWM).
func procUsage(pid int) (float64, int64, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// Fields after the command name, which is in parentheses and may hold
	// spaces: state is field 3, utime 14, stime 15.
	s := string(stat)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	cpu := (ut + st) / 100

	fh, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return cpu, 0, err
	}
	defer fh.Close()
	var hwm int64
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			hwm = kb << 10
		}
	}
	return cpu, hwm, sc.Err()
}
