// Package cluster runs a NATS cluster of real nats-server processes for the
// cluster and chaos tests: a process can be killed with SIGKILL, stalled with
// SIGSTOP, lose its data directory and be restarted, as a node in production
// can. The binary is built from the nats-server module at the version this
// module pins, so a fresh machine needs nothing but Go.
package cluster

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/repo"
	"github.com/bulkhead-io/bulkhead/pkg/natstest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// serverModule is the module whose main package is nats-server.
const serverModule = "github.com/nats-io/nats-server/v2"

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary returns the path of a nats-server binary built from the pinned
// module version, building it on first use into .build/bin at the
// repository root (kept across runs; the version is in its name).
func Binary() (string, error) {
	buildOnce.Do(func() { binPath, buildErr = build() })
	return binPath, buildErr
}

func build() (string, error) {
	root, err := repo.Root()
	if err != nil {
		return "", err
	}
	// Test binaries carry no dependency list, so ask the module system.
	list := exec.Command("go", "list", "-m", "-f", "{{.Version}}", serverModule)
	list.Dir = filepath.Join(root, "e2e")
	v, err := list.Output()
	if err != nil {
		return "", fmt.Errorf("cluster: version of %s: %w", serverModule, err)
	}
	version := strings.TrimSpace(string(v))
	out := filepath.Join(root, ".build", "bin", "nats-server-"+version)
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	// Build inside the e2e module, so the workspace's pinned version is used.
	cmd := exec.Command("go", "build", "-o", out+".tmp", serverModule)
	cmd.Dir = filepath.Join(root, "e2e")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("cluster: build nats-server %s: %v: %s", version, err, stderr.String())
	}
	if err := os.Rename(out+".tmp", out); err != nil {
		return "", fmt.Errorf("cluster: %w", err)
	}
	return out, nil
}

// Cluster is a running set of nats-server processes on loopback.
type Cluster struct {
	t     testing.TB
	bin   string
	nodes []*Node
}

// Node is one nats-server process with fixed ports and data directory, so
// it comes back as the same cluster member after a restart.
type Node struct {
	Name        string
	ClientPort  int
	ClusterPort int
	Dir         string // the store directory
	conf        string
	log         string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// Start runs an n-node cluster and waits until JetStream answers. Every
// process is killed in t.Cleanup.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		t.Fatal(err)
	}
	c := &Cluster{t: t, bin: bin}
	base := t.TempDir()
	for i := range n {
		c.nodes = append(c.nodes, &Node{
			Name: fmt.Sprintf("n%d", i), ClientPort: natstest.FreePort(t), ClusterPort: natstest.FreePort(t),
			Dir: filepath.Join(base, fmt.Sprintf("n%d", i), "data"),
		})
	}
	var routes []string
	for _, nd := range c.nodes {
		routes = append(routes, fmt.Sprintf("nats://127.0.0.1:%d", nd.ClusterPort))
	}
	for _, nd := range c.nodes {
		dir := filepath.Dir(nd.Dir)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		nd.conf = filepath.Join(dir, "nats.conf")
		nd.log = filepath.Join(dir, "nats.log")
		conf := fmt.Sprintf(`server_name: %s
listen: 127.0.0.1:%d
max_payload: 2MB
jetstream { store_dir: %q }
cluster {
  name: chaos
  listen: 127.0.0.1:%d
  routes: [ %s ]
  connect_retries: 120
}
`, nd.Name, nd.ClientPort, nd.Dir, nd.ClusterPort, strings.Join(routes, ", "))
		if err := os.WriteFile(nd.conf, []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, nd := range c.nodes {
			nd.signal(syscall.SIGCONT) // a stalled process cannot die otherwise
			nd.kill()
		}
		if t.Failed() {
			for _, nd := range c.nodes {
				if b, err := os.ReadFile(nd.log); err == nil {
					t.Logf("%s log (last 40 lines):\n%s", nd.Name, tail(string(b), 40))
				}
			}
		}
	})
	for i := range c.nodes {
		c.StartNode(i)
	}
	c.WaitReady(60 * time.Second)
	return c
}

// URLs returns every node's client URL, comma-separated.
func (c *Cluster) URLs() string {
	var urls []string
	for _, nd := range c.nodes {
		urls = append(urls, fmt.Sprintf("nats://127.0.0.1:%d", nd.ClientPort))
	}
	return strings.Join(urls, ",")
}

// Nodes returns the nodes, in start order.
func (c *Cluster) Nodes() []*Node { return c.nodes }

// StartNode starts node i's process; it must not be running.
func (c *Cluster) StartNode(i int) {
	c.t.Helper()
	nd := c.nodes[i]
	logf, err := os.OpenFile(nd.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	cmd := exec.Command(c.bin, "-c", nd.conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		c.t.Fatalf("start %s: %v", nd.Name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}()
	nd.mu.Lock()
	nd.cmd, nd.done = cmd, done
	nd.mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", nd.ClientPort), time.Second)
		if err == nil {
			conn.Close()
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s does not listen after 30s", nd.Name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Kill sends SIGKILL to node i and waits until it has exited.
func (c *Cluster) Kill(i int) { c.nodes[i].kill() }

// Terminate sends SIGTERM to node i and waits until it has exited (a
// clean shutdown).
func (c *Cluster) Terminate(i int) {
	nd := c.nodes[i]
	nd.signal(syscall.SIGTERM)
	nd.wait()
}

// Stall stops node i with SIGSTOP: it holds its connections and answers
// nothing, as a node in a long GC pause or on a frozen VM does.
func (c *Cluster) Stall(i int) { c.nodes[i].signal(syscall.SIGSTOP) }

// Resume continues a stalled node with SIGCONT.
func (c *Cluster) Resume(i int) { c.nodes[i].signal(syscall.SIGCONT) }

// WipeData deletes node i's store directory; the node must be down.
func (c *Cluster) WipeData(i int) {
	c.t.Helper()
	if err := os.RemoveAll(c.nodes[i].Dir); err != nil {
		c.t.Fatal(err)
	}
}

// RestartAll terminates every node, then starts them all again and waits
// for JetStream: a full cluster restart.
func (c *Cluster) RestartAll() {
	c.t.Helper()
	for i := range c.nodes {
		c.Terminate(i)
	}
	for i := range c.nodes {
		c.StartNode(i)
	}
	c.WaitReady(90 * time.Second)
}

// WaitReady waits until a client can use JetStream on the cluster.
func (c *Cluster) WaitReady(within time.Duration) {
	c.t.Helper()
	nc, err := nats.Connect(c.URLs(), nats.MaxReconnects(-1))
	if err != nil {
		c.t.Fatalf("nats connect: %v", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		c.t.Fatal(err)
	}
	deadline := time.Now().Add(within)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := js.AccountInfo(ctx)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("jetstream not ready after %v: %v", within, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// LeaderOf returns the index of the node leading a stream (or, with a
// consumer name, that consumer), asking the cluster through nc.
func (c *Cluster) LeaderOf(ctx context.Context, js jetstream.JetStream, stream, consumer string) (int, error) {
	var leader string
	if consumer == "" {
		s, err := js.Stream(ctx, stream)
		if err != nil {
			return -1, err
		}
		if ci := s.CachedInfo().Cluster; ci != nil {
			leader = ci.Leader
		}
	} else {
		cons, err := js.Consumer(ctx, stream, consumer)
		if err != nil {
			return -1, err
		}
		if ci := cons.CachedInfo().Cluster; ci != nil {
			leader = ci.Leader
		}
	}
	for i, nd := range c.nodes {
		if nd.Name == leader {
			return i, nil
		}
	}
	return -1, fmt.Errorf("%s %s has no leader", stream, consumer)
}

func (nd *Node) signal(sig syscall.Signal) {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cmd != nil && nd.cmd.Process != nil {
		_ = nd.cmd.Process.Signal(sig)
	}
}

func (nd *Node) kill() {
	nd.signal(syscall.SIGKILL)
	nd.wait()
}

func (nd *Node) wait() {
	nd.mu.Lock()
	done := nd.done
	nd.mu.Unlock()
	if done != nil {
		<-done
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
