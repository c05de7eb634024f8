package natstest

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/poll"
)

// Cluster is an in-process JetStream cluster whose nodes keep their ports
// and store directories across restarts, so clients reconnect to the same
// URLs and streams come back with their data.
type Cluster struct {
	t    testing.TB
	mu   sync.Mutex
	opts []*server.Options
	srvs []*server.Server // nil while a node is down
}

// RunCluster starts an n-node JetStream cluster on loopback and waits until
// it has a meta leader; every node is shut down in t.Cleanup. Ports are
// picked free just before use, so another process can take one in between:
// a first start that fails is tried again with new ports.
func RunCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	var err error
	for range 3 {
		var c *Cluster
		if c, err = tryCluster(t, n); err == nil {
			t.Cleanup(c.shutdown)
			c.WaitReady()
			return c
		}
		t.Logf("cluster did not start (%v); trying other ports", err)
	}
	t.Fatalf("cluster: %v", err)
	return nil
}

func tryCluster(t testing.TB, n int) (*Cluster, error) {
	var routes []*url.URL
	cports := make([]int, n)
	for i := range n {
		cports[i] = FreePort(t)
		routes = append(routes, &url.URL{Scheme: "nats", Host: fmt.Sprintf("127.0.0.1:%d", cports[i])})
	}
	c := &Cluster{t: t, srvs: make([]*server.Server, n)}
	for i := range n {
		o := &server.Options{
			ServerName: fmt.Sprintf("n%d", i),
			Host:       "127.0.0.1",
			Port:       FreePort(t),
			JetStream:  true,
			StoreDir:   t.TempDir(),
			NoLog:      true,
			NoSigs:     true,
			Cluster:    server.ClusterOpts{Name: "test", Host: "127.0.0.1", Port: cports[i]},
			Routes:     routes,
		}
		c.opts = append(c.opts, o)
	}
	for i := range n {
		if err := c.start(i); err != nil {
			c.shutdown()
			return nil, err
		}
	}
	return c, nil
}

// URLs returns the client URLs of every node, comma-separated.
func (c *Cluster) URLs() string {
	var urls []string
	for _, o := range c.opts {
		urls = append(urls, fmt.Sprintf("nats://127.0.0.1:%d", o.Port))
	}
	return strings.Join(urls, ",")
}

// Start starts node i (again) with its ports and store directory.
func (c *Cluster) Start(i int) {
	c.t.Helper()
	if err := c.start(i); err != nil {
		c.t.Fatal(err)
	}
}

func (c *Cluster) start(i int) error {
	o := c.opts[i].Clone()
	o.NoLog = false
	s, err := server.NewServer(o)
	if err != nil {
		return fmt.Errorf("nats node %d: %w", i, err)
	}
	errs := &errorLog{}
	s.SetLogger(errs, false, false)
	s.Start()
	if !s.ReadyForConnections(20 * time.Second) {
		s.Shutdown()
		return fmt.Errorf("nats node %d not ready in 20s (port %d, cluster port %d): %s", i, o.Port, o.Cluster.Port, errs)
	}
	c.mu.Lock()
	c.srvs[i] = s
	c.mu.Unlock()
	return nil
}

// Stop shuts node i down and waits until it has stopped.
func (c *Cluster) Stop(i int) {
	c.mu.Lock()
	s := c.srvs[i]
	c.srvs[i] = nil
	c.mu.Unlock()
	if s != nil {
		s.Shutdown()
		s.WaitForShutdown()
	}
}

// Restart stops every node, then starts them all again, and waits until
// JetStream has a meta leader: a full cluster restart.
func (c *Cluster) Restart() {
	c.t.Helper()
	for i := range c.opts {
		c.Stop(i)
	}
	for i := range c.opts {
		c.Start(i)
	}
	c.WaitReady()
}

// Server returns node i, or nil while it is down.
func (c *Cluster) Server(i int) *server.Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.srvs[i]
}

// WaitReady waits until a client can use JetStream on the cluster.
func (c *Cluster) WaitReady() {
	c.t.Helper()
	nc, err := nats.Connect(c.URLs())
	if err != nil {
		c.t.Fatalf("nats connect: %v", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		c.t.Fatalf("jetstream: %v", err)
	}
	poll.CheckFor(c.t, 60*time.Second, 100*time.Millisecond, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := js.AccountInfo(ctx)
		return err
	})
}

func (c *Cluster) shutdown() {
	for i := range c.opts {
		c.Stop(i)
	}
}

// ConnectCluster opens a client connection to every node of c that
// reconnects forever, closed in t.Cleanup.
func ConnectCluster(t testing.TB, c *Cluster) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(c.URLs(), nats.Name(t.Name()), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatalf("nats connect: %v", err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("jetstream: %v", err)
	}
	return nc, js
}

// StepDownConsumer asks the leader of a consumer to step down, so another
// node (or, after an election, the same one) leads it; the leader's pending
// pull requests are not carried over.
func StepDownConsumer(ctx context.Context, nc *nats.Conn, stream, consumer string) error {
	subj := fmt.Sprintf("$JS.API.CONSUMER.LEADER.STEPDOWN.%s.%s", stream, consumer)
	m, err := nc.RequestWithContext(ctx, subj, nil)
	if err != nil {
		return fmt.Errorf("step down %s/%s: %w", stream, consumer, err)
	}
	if strings.Contains(string(m.Data), `"error"`) {
		return fmt.Errorf("step down %s/%s: %s", stream, consumer, m.Data)
	}
	return nil
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// errorLog keeps a server's errors, for the message when it fails to start.
type errorLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *errorLog) keep(format string, v ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lines) < 20 {
		l.lines = append(l.lines, fmt.Sprintf(format, v...))
	}
}

func (l *errorLog) Noticef(string, ...any)         {}
func (l *errorLog) Debugf(string, ...any)          {}
func (l *errorLog) Tracef(string, ...any)          {}
func (l *errorLog) Warnf(string, ...any)           {}
func (l *errorLog) Errorf(format string, v ...any) { l.keep(format, v...) }
func (l *errorLog) Fatalf(format string, v ...any) { l.keep(format, v...) }

func (l *errorLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "; ")
}
