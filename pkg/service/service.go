// Package service holds the scaffolding every Bulkhead binary shares: the
// common configuration (NATS, metrics, logging) and running components
// together until shutdown, which drains in-flight work within a bound.
package service

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/bulkhead-io/bulkhead/pkg/conf"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/pkg/natsconn"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/telemetry"
)

// Base is the configuration every service has.
type Base struct {
	// NATS says where JetStream is.
	NATS natsconn.Options
	// MetricsAddr serves /metrics, /healthz and /debug/pprof.
	MetricsAddr string
	// LogLevel is debug, info, warn or error.
	LogLevel string
	// ShutdownTimeout bounds the drain of in-flight work at shutdown.
	ShutdownTimeout time.Duration
	// OwnsStreams is set by RegisterStreamFlags: this service creates and
	// updates the streams and buckets with Streams; every other service only
	// waits for them to exist.
	OwnsStreams bool
	// Streams sizes the streams; used only by the owner.
	Streams stream.Limits
}

// RegisterFlags adds the common flags with the service's defaults.
func (b *Base) RegisterFlags(fs *flag.FlagSet, name, metricsAddr string) {
	b.NATS.Name = "bulkhead-" + name
	fs.StringVar(&b.NATS.URL, "nats-url", "nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
	fs.StringVar(&b.NATS.CredsFile, "nats-creds", "", "NATS credentials file")
	fs.StringVar(&b.NATS.User, "nats-user", "", "NATS user (when no credentials file)")
	fs.StringVar(&b.NATS.Password, "nats-password", "", "NATS password")
	fs.StringVar(&b.MetricsAddr, "metrics-addr", metricsAddr, "address for /metrics, /healthz and /debug/pprof (empty: off)")
	fs.StringVar(&b.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.DurationVar(&b.ShutdownTimeout, "shutdown-timeout", 15*time.Second, "bound on draining in-flight work at shutdown")
}

// RegisterStreamFlags makes this service the owner of the streams'
// configuration and adds its flags. One service (the monitor) calls it, so
// the streams have one configuration, whatever flags the others start with.
func (b *Base) RegisterStreamFlags(fs *flag.FlagSet) {
	d := stream.DefaultLimits()
	b.OwnsStreams, b.Streams = true, d
	fs.IntVar(&b.Streams.Replicas, "stream-replicas", d.Replicas, "replicas of every stream and bucket (3 in a cluster)")
	fs.Int64Var(&b.Streams.ImpressionsMaxBytes, "impressions-max-bytes", d.ImpressionsMaxBytes, "IMPRESSIONS stream size; when full, ingest refuses")
	fs.Int64Var(&b.Streams.DeliveryMaxBytes, "delivery-max-bytes", d.DeliveryMaxBytes, "DELIVERY stream size; when full, routing waits")
	fs.Int64Var(&b.Streams.ParkedMaxBytes, "parked-max-bytes", d.ParkedMaxBytes, "PARKED stream size; when full, routing waits and alarms")
	fs.DurationVar(&b.Streams.ParkedMaxAge, "export-window", d.ParkedMaxAge, "how long parked impressions are kept for replay and export")
	fs.DurationVar(&b.Streams.DedupWindow, "dedup-window", d.DedupWindow, "how long an idempotency key is remembered")
	fs.Int64Var(&b.Streams.TenantBacklog, "tenant-backlog-batches", d.TenantBacklog, "a tenant's share of IMPRESSIONS (accepted, not yet routed), in batches; beyond it ingest refuses that tenant")
	fs.Int64Var(&b.Streams.DestinationBacklog, "destination-backlog-batches", d.DestinationBacklog, "a destination's share of DELIVERY, in batches; beyond it its new batches are parked")
	fs.Int64Var(&b.Streams.DestinationParked, "destination-parked-batches", d.DestinationParked, "a destination's share of PARKED, in batches (its tenant is refused at ingest before it is reached)")
	fs.BoolVar(&b.Streams.AllowShrink, "allow-stream-shrink", false, "let a smaller -*-max-bytes or -export-window shrink existing streams (deletes parked data older than the new window)")
}

// Connect connects to NATS. The owner of the streams then creates or
// updates them (refusing to shrink one unless told to); every other service
// waits until they exist, for as long as ctx lives.
func (b Base) Connect(ctx context.Context, log *slog.Logger) (*nats.Conn, jetstream.JetStream, error) {
	nc, js, err := natsconn.Connect(ctx, b.NATS, log)
	if err != nil {
		return nil, nil, err
	}
	if b.OwnsStreams {
		// Until ctx ends: NATS may not be up yet.
		err = stream.Ensure(ctx, js, b.Streams)
	} else {
		err = stream.Await(ctx, js, func(missing string) {
			log.Warn("waiting for the monitor to create the streams", "missing", missing)
		})
	}
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}

// Drain stops nc after its subscriptions and pending publishes are flushed.
func Drain(nc *nats.Conn, timeout time.Duration, log *slog.Logger) {
	closed := make(chan struct{})
	nc.SetClosedHandler(func(*nats.Conn) { close(closed) })
	if err := nc.Drain(); err != nil {
		nc.Close()
		return
	}
	select {
	case <-closed:
	case <-time.After(timeout):
		log.Warn("nats drain timed out; closing")
		nc.Close()
	}
}

// Validate checks the common configuration.
func (b Base) Validate() error {
	if b.NATS.URL == "" {
		return errors.New("nats-url is required")
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(b.LogLevel)); err != nil {
		return fmt.Errorf("log-level: %w", err)
	}
	if b.ShutdownTimeout <= 0 {
		return errors.New("shutdown-timeout must be positive")
	}
	return nil
}

// LogValue logs the configuration with secrets masked.
func (b Base) LogValue() slog.Value {
	pw := ""
	if b.NATS.Password != "" {
		pw = "****"
	}
	return slog.GroupValue(
		slog.String("nats_url", b.NATS.URL), slog.String("nats_creds", b.NATS.CredsFile),
		slog.String("nats_user", b.NATS.User), slog.String("nats_password", pw),
		slog.String("metrics_addr", b.MetricsAddr), slog.String("log_level", b.LogLevel),
		slog.Duration("shutdown_timeout", b.ShutdownTimeout))
}

// Component is one long-running part of a service. Run blocks until ctx ends
// (or it fails), then finishes its in-flight work and returns.
type Component struct {
	Name string
	Run  func(ctx context.Context) error
}

// RunAll runs the components until ctx ends or one of them fails, and returns
// the first failure. Every component sees the same cancellation.
func RunAll(ctx context.Context, comps ...Component) error {
	g, ctx := errgroup.WithContext(ctx)
	for _, c := range comps {
		g.Go(func() error {
			if err := c.Run(ctx); err != nil {
				return fmt.Errorf("%s: %w", c.Name, err)
			}
			return nil
		})
	}
	return g.Wait()
}

// GRPC serves s on lis until ctx ends, then stops it gracefully within timeout.
func GRPC(s *grpcserver.Server, lis net.Listener, timeout time.Duration) Component {
	return Component{Name: "grpc " + lis.Addr().String(), Run: func(ctx context.Context) error {
		return serveUntil(ctx, func() error { return s.Serve(lis) },
			func(ctx context.Context) error { s.Shutdown(ctx); return nil }, timeout)
	}}
}

// NATSHealth keeps gs's health NOT_SERVING while nc is not connected to
// NATS and SERVING while it is, until ctx ends: a service that cannot reach
// JetStream cannot do its work, and its health says so.
func NATSHealth(nc *nats.Conn, gs *grpcserver.Server, log *slog.Logger) Component {
	return Component{Name: "nats health", Run: func(ctx context.Context) error {
		changes := nc.StatusChanged(nats.CONNECTED, nats.RECONNECTING, nats.DISCONNECTED, nats.CLOSED)
		defer nc.RemoveStatusListener(changes)
		gs.SetServing(nc.IsConnected())
		for {
			select {
			case <-ctx.Done():
				return nil
			case st, ok := <-changes:
				if !ok {
					return nil
				}
				serving := st == nats.CONNECTED
				if !serving {
					log.Warn("nats not connected; health NOT_SERVING", "status", st.String())
				}
				gs.SetServing(serving)
			}
		}
	}}
}

// Metrics serves m until ctx ends.
func Metrics(m *telemetry.MetricsServer, timeout time.Duration) Component {
	return Component{Name: "metrics", Run: func(ctx context.Context) error {
		return serveUntil(ctx, m.Serve, m.Shutdown, timeout)
	}}
}

// serveUntil runs serve until it fails or ctx ends; then it calls shutdown,
// bounded by timeout, waits for serve to return and reports shutdown's error.
func serveUntil(ctx context.Context, serve func() error, shutdown func(context.Context) error, timeout time.Duration) error {
	errc := make(chan error, 1)
	go func() { errc <- serve() }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err := shutdown(sctx)
	<-errc
	return err
}

// Listen opens addr, or returns nil for an empty addr.
func Listen(addr string) (net.Listener, error) {
	if addr == "" {
		return nil, nil
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return lis, nil
}

// ReplicaID names this process among replicas: host name and a random suffix.
func ReplicaID() string {
	host, err := os.Hostname()
	if err != nil {
		host = "replica"
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	return host + "-" + hex.EncodeToString(b[:])
}

// Validator is a configuration that can check itself.
type Validator interface{ Validate() error }

// Parse builds a service's configuration: its flags (registered by flags),
// then BULKHEAD_<SVC>_* variables for the flags not given in args, then
// Validate.
func Parse[C Validator](name, envPrefix string, flags func(*flag.FlagSet) C, args []string) (C, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	c := flags(fs)
	if err := conf.Parse(fs, envPrefix, args); err != nil {
		return c, err
	}
	return c, c.Validate()
}

// Level is the configured log level.
func (b Base) Level() string { return b.LogLevel }

// Main is the whole of a service's main function: it parses the
// configuration from the command line and environment, builds the JSON
// logger, and runs the service until SIGINT or SIGTERM. It exits 2 on a
// configuration error and 1 when the service fails.
func Main[C interface{ Level() string }](name string, parse func([]string) (C, error), run func(context.Context, C, *slog.Logger) error) {
	cfg, err := parse(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: config: %v\n", name, err)
		os.Exit(2)
	}
	log, err := telemetry.NewLogger(os.Stderr, cfg.Level())
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err = run(ctx, cfg, log)
	stop()
	if err != nil {
		log.Error(name+" stopped", "err", err)
		os.Exit(1)
	}
}
