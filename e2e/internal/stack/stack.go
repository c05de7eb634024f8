// Package stack starts the whole of Bulkhead in-process for end-to-end tests
// and benchmarks: an embedded NATS server with JetStream and real ingest,
// router, deliverer and monitor services on loopback listeners, talking over
// real gRPC and NATS connections.
package stack

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/services/deliverer"
	"github.com/bulkhead-io/bulkhead/services/ingest"
	"github.com/bulkhead-io/bulkhead/services/monitor"
	"github.com/bulkhead-io/bulkhead/services/router"
)

// Credentials the stack is configured with.
const (
	AdminToken  = "test-admin"
	ViewerToken = "test-viewer"
)

// Configs are the services' configurations, for Options.Tune to adjust.
type Configs struct {
	Ingest    *ingest.Config
	Router    *router.Config
	Deliverer *deliverer.Config
	Monitor   *monitor.Config
}

// Options shape a stack.
type Options struct {
	// StoreDir holds JetStream's data; required.
	StoreDir string
	// Tenants maps API keys to tenants (default: "key-<t>" for t1..t3).
	APIKeys []string
	// Monitors is the number of monitor replicas (default 1).
	Monitors int
	// Tune adjusts the configurations before the services start.
	Tune func(*Configs)
	// Log receives the services' logs (default: discarded, or stderr when
	// BULKHEAD_TEST_LOG is set).
	Log *slog.Logger
	// NATSURL, when set, is an external NATS cluster (e2e/internal/cluster)
	// the services use instead of an embedded server; StoreDir is then
	// unused and every stream and bucket has three replicas.
	NATSURL string
}

// Stack is a running system.
type Stack struct {
	// NATS is the embedded server; nil with Options.NATSURL.
	NATS       *server.Server
	IngestAddr string
	AdminAddrs []string
	Configs    Configs

	conns []*grpc.ClientConn
	log   *slog.Logger

	mu    sync.Mutex
	procs map[string]*proc
}

type proc struct {
	cancel context.CancelFunc
	done   chan error
}

// Start starts NATS and the services and returns once every gRPC port answers.
func Start(opts Options) (*Stack, error) {
	if opts.StoreDir == "" && opts.NATSURL == "" {
		return nil, errors.New("stack: StoreDir or NATSURL is required")
	}
	if opts.Monitors == 0 {
		opts.Monitors = 1
	}
	if len(opts.APIKeys) == 0 {
		opts.APIKeys = []string{"key-t1=t1", "key-t2=t2", "key-t3=t3"}
	}
	log := opts.Log
	if log == nil {
		w := io.Writer(io.Discard)
		if os.Getenv("BULKHEAD_TEST_LOG") != "" {
			w = os.Stderr
		}
		log = slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	s := &Stack{log: log, procs: map[string]*proc{}}
	url, replicas := opts.NATSURL, "3"
	if url == "" {
		ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: opts.StoreDir, NoLog: true, NoSigs: true})
		if err != nil {
			return nil, err
		}
		ns.Start()
		if !ns.ReadyForConnections(10 * time.Second) {
			ns.Shutdown()
			return nil, errors.New("stack: nats not ready")
		}
		s.NATS, url, replicas = ns, ns.ClientURL(), "1"
	}
	allow := "127.0.0.0/8,::1/128"
	base := func(extra map[string]string) map[string]string {
		extra["nats-url"], extra["metrics-addr"] = url, ""
		return extra
	}

	cfgs := Configs{
		Ingest: parse(ingest.Flags, base(map[string]string{"api-keys": join(opts.APIKeys)})),
		Router: parse(router.Flags, base(map[string]string{})),
		Deliverer: parse(deliverer.Flags, base(map[string]string{"allow-nets": allow,
			"retry-base": "100ms", "retry-max": "2s"})),
		// The monitor owns the streams; the others wait for them.
		Monitor: parse(monitor.Flags, base(map[string]string{"stream-replicas": replicas, "allow-nets": allow,
			"admin-tokens":    "admin:" + AdminToken + ":operator,viewer:" + ViewerToken + ":read",
			"request-timeout": "2s", "probe-initial": "500ms", "probe-max": "4s"})),
	}
	if opts.Tune != nil {
		opts.Tune(&cfgs)
	}
	s.Configs = cfgs
	for _, v := range []interface{ Validate() error }{cfgs.Ingest, cfgs.Router, cfgs.Deliverer, cfgs.Monitor} {
		if err := v.Validate(); err != nil {
			s.Close()
			return nil, err
		}
	}

	ingLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.Close()
		return nil, err
	}
	s.IngestAddr = ingLis.Addr().String()
	for i := range opts.Monitors {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			s.Close()
			return nil, err
		}
		s.AdminAddrs = append(s.AdminAddrs, lis.Addr().String())
		mc := *cfgs.Monitor
		mc.Engine.Holder = fmt.Sprintf("monitor-%d", i)
		s.start(fmt.Sprintf("monitor-%d", i), func(ctx context.Context) error {
			return monitor.Run(ctx, &mc, log.With("service", mc.Engine.Holder), monitor.Listeners{Admin: lis})
		})
	}
	s.start("router", func(ctx context.Context) error {
		return router.Run(ctx, cfgs.Router, log.With("service", "router"), nil)
	})
	s.start("deliverer", func(ctx context.Context) error {
		return deliverer.Run(ctx, cfgs.Deliverer, log.With("service", "deliverer"), nil)
	})
	s.start("ingest", func(ctx context.Context) error {
		return ingest.Run(ctx, cfgs.Ingest, log.With("service", "ingest"), ingest.Listeners{GRPC: ingLis})
	})
	if err := s.waitServing(append([]string{s.IngestAddr}, s.AdminAddrs...)); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// waitServing waits until every address answers SERVING: the service has
// connected, created its streams and serves.
func (s *Stack) waitServing(addrs []string) error {
	// Generous: on a fresh cluster the streams' leaders are being elected.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, addr := range addrs {
		if err := grpcserver.WaitServing(ctx, addr); err != nil {
			return fmt.Errorf("stack: %w", err)
		}
	}
	return nil
}

func (s *Stack) start(name string, run func(context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	p := &proc{cancel: cancel, done: make(chan error, 1)}
	s.mu.Lock()
	s.procs[name] = p
	s.mu.Unlock()
	go func() {
		err := run(ctx)
		if err != nil && ctx.Err() == nil {
			s.log.Error("service failed", "service", name, "err", err)
		}
		p.done <- err
	}()
}

// StopService stops one service (e.g. "monitor-0") and waits for it.
func (s *Stack) StopService(name string) error {
	s.mu.Lock()
	p := s.procs[name]
	delete(s.procs, name)
	s.mu.Unlock()
	if p == nil {
		return fmt.Errorf("no service %q", name)
	}
	p.cancel()
	return <-p.done
}

// CloseClients closes the client connections made with Dial.
func (s *Stack) CloseClients() {
	for _, c := range s.conns {
		_ = c.Close()
	}
	s.conns = nil
}

// Close stops every service, then NATS.
func (s *Stack) Close() {
	s.CloseClients()
	s.mu.Lock()
	procs := s.procs
	s.procs = map[string]*proc{}
	s.mu.Unlock()
	for _, p := range procs {
		p.cancel()
	}
	for _, p := range procs {
		<-p.done
	}
	if s.NATS != nil {
		s.NATS.Shutdown()
		s.NATS.WaitForShutdown()
	}
}

// Dial returns a client connection to addr, closed by Close.
func (s *Stack) Dial(addr string) (*grpc.ClientConn, error) {
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	s.conns = append(s.conns, c)
	return c, nil
}

// IngestClient returns a client of the IngestService.
func (s *Stack) IngestClient() (ingestv1.IngestServiceClient, error) {
	c, err := s.Dial(s.IngestAddr)
	if err != nil {
		return nil, err
	}
	return ingestv1.NewIngestServiceClient(c), nil
}

// AdminClient returns a client of the i-th monitor's AdminService.
func (s *Stack) AdminClient(i int) (adminv1.AdminServiceClient, error) {
	c, err := s.Dial(s.AdminAddrs[i])
	if err != nil {
		return nil, err
	}
	return adminv1.NewAdminServiceClient(c), nil
}

// WithToken returns ctx carrying `authorization: Bearer <token>`.
func WithToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

func parse[C any](flags func(*flag.FlagSet) *C, values map[string]string) *C {
	fs := flag.NewFlagSet("stack", flag.PanicOnError)
	c := flags(fs)
	for k, v := range values {
		if err := fs.Set(k, v); err != nil {
			panic(fmt.Sprintf("stack: flag %s=%q: %v", k, v, err))
		}
	}
	return c
}

func join(s []string) string {
	out := ""
	for i, x := range s {
		if i > 0 {
			out += ","
		}
		out += x
	}
	return out
}
