// Package ingest wires the ingest service: configuration, NATS, the gRPC
// IngestService and metrics. main and the dev stack start it with Serve
// (listening where it is configured to); tests and the e2e stack with Run
// (on listeners they opened).
package ingest

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
	"github.com/bulkhead-io/bulkhead/pkg/conf"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/service"
	"github.com/bulkhead-io/bulkhead/pkg/telemetry"
	"github.com/bulkhead-io/bulkhead/services/ingest/internal/api"
	"github.com/bulkhead-io/bulkhead/services/ingest/internal/keys"
)

// EnvPrefix prefixes the environment variables of this service.
const EnvPrefix = "BULKHEAD_INGEST"

// DefaultTenantRate is -tenant-rate's default, impressions/s: a quarter of
// what the whole pipeline sustained on the reference machine
// (docs/bench/throughput.md), so one tenant at its rate leaves three
// quarters to the others. Measure your deployment and set it from that.
const DefaultTenantRate = 25000

// Config is the ingest service's configuration.
type Config struct {
	service.Base
	// GRPCAddr serves IngestService.
	GRPCAddr string
	// APIKeys are "key=tenant" pairs.
	APIKeys conf.StringList
	// MaxBatchBytes bounds one serialized batch.
	MaxBatchBytes int
	// TenantRate is impressions/s per tenant (0: unlimited).
	TenantRate float64
	// TenantBurst is the most impressions a tenant may submit at once.
	TenantBurst int
	// PublishTimeout bounds the wait for JetStream to store a batch.
	PublishTimeout time.Duration
	// MaxInflightBytes and TenantInflightBytes bound the request bytes
	// calls may make ingest hold, in all and per tenant.
	MaxInflightBytes    int64
	TenantInflightBytes int64
	// MaxConcurrentStreams bounds the calls of one connection.
	MaxConcurrentStreams uint
}

// Flags registers the configuration's flags on fs and returns it with defaults.
func Flags(fs *flag.FlagSet) *Config {
	c := &Config{}
	c.Base.RegisterFlags(fs, "ingest", "127.0.0.1:7410")
	fs.StringVar(&c.GRPCAddr, "grpc-addr", "127.0.0.1:7400", "address of the IngestService")
	fs.Var(&c.APIKeys, "api-keys", "comma-separated key=tenant pairs")
	fs.IntVar(&c.MaxBatchBytes, "max-batch-bytes", 1<<20, "largest serialized batch accepted")
	// A fair share of measured capacity, not a number above it: a quarter of
	// the 107,568 impressions/s `make bench-throughput` sustained on the
	// reference 2-core machine, so no one tenant can take the pipeline.
	fs.Float64Var(&c.TenantRate, "tenant-rate", DefaultTenantRate, "delivered impressions per second per tenant, a batch counting its impressions × the tenant's destinations (0: unlimited); default a quarter of the measured capacity of a 2-core machine")
	fs.IntVar(&c.TenantBurst, "tenant-burst", 2*DefaultTenantRate, "impressions a tenant may submit at once")
	fs.DurationVar(&c.PublishTimeout, "publish-timeout", 5*time.Second, "bound on waiting for JetStream to store a batch")
	fs.Int64Var(&c.MaxInflightBytes, "max-inflight-bytes", api.DefaultMaxInflightBytes, "request bytes all calls together may make ingest hold; beyond it calls are refused (INGEST_BUSY) before they are read")
	fs.Int64Var(&c.TenantInflightBytes, "tenant-inflight-bytes", api.DefaultMaxInflightBytes/2, "request bytes one tenant's calls may make ingest hold")
	fs.UintVar(&c.MaxConcurrentStreams, "max-concurrent-streams", uint(grpcserver.DefaultMaxConcurrentStreams), "calls one connection may have open at once")
	return c
}

// ParseConfig reads flags and BULKHEAD_INGEST_* variables, then validates.
func ParseConfig(args []string) (*Config, error) {
	return service.Parse("ingest", EnvPrefix, Flags, args)
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if err := c.Base.Validate(); err != nil {
		return err
	}
	if len(c.APIKeys) == 0 {
		return errors.New("api-keys: at least one key=tenant pair is required")
	}
	if _, err := keys.Parse(c.APIKeys); err != nil {
		return err
	}
	if c.MaxBatchBytes < 1024 || c.MaxBatchBytes > 16<<20 {
		return fmt.Errorf("max-batch-bytes %d: want 1 KiB to 16 MiB", c.MaxBatchBytes)
	}
	if c.TenantRate < 0 || (c.TenantRate > 0 && c.TenantBurst < 1000) {
		return errors.New("tenant-rate must be ≥ 0 and tenant-burst ≥ 1000 (one full batch)")
	}
	if c.PublishTimeout <= 0 {
		return errors.New("publish-timeout must be positive")
	}
	// One Submit reserves up to 3 × max-batch-bytes (the request gRPC may
	// read, twice the limit, and the batch stored from it).
	if need := 3 * int64(c.MaxBatchBytes); c.TenantInflightBytes < need || c.MaxInflightBytes < c.TenantInflightBytes {
		return fmt.Errorf("tenant-inflight-bytes must be ≥ 3 × max-batch-bytes (%d) and ≤ max-inflight-bytes", need)
	}
	if c.MaxConcurrentStreams < 1 || c.MaxConcurrentStreams > 1<<16 {
		return errors.New("max-concurrent-streams must be within 1..65536")
	}
	return nil
}

// LogValue logs the configuration with API keys masked.
func (c *Config) LogValue() slog.Value {
	masked := make([]string, len(c.APIKeys))
	for i, p := range c.APIKeys {
		k, t, _ := strings.Cut(p, "=")
		masked[i] = conf.Mask(k) + "=" + t
	}
	return slog.GroupValue(slog.Any("base", c.Base), slog.String("grpc_addr", c.GRPCAddr),
		slog.Any("api_keys", masked), slog.Int("max_batch_bytes", c.MaxBatchBytes),
		slog.Float64("tenant_rate", c.TenantRate), slog.Int("tenant_burst", c.TenantBurst))
}

// Listeners are where the service serves; tests pass :0 listeners.
type Listeners struct {
	GRPC    net.Listener
	Metrics net.Listener // nil: no metrics server
}

// Serve opens the configured listeners and runs the service until ctx ends.
func Serve(ctx context.Context, c *Config, log *slog.Logger) error {
	g, err := service.Listen(c.GRPCAddr)
	if err != nil {
		return err
	}
	m, err := service.Listen(c.MetricsAddr)
	if err != nil {
		_ = g.Close()
		return err
	}
	return Run(ctx, c, log, Listeners{GRPC: g, Metrics: m})
}

// Run runs the service on the given listeners until ctx ends, then stops
// accepting calls, finishes those in flight and drains NATS.
func Run(ctx context.Context, c *Config, log *slog.Logger, lis Listeners) error {
	log.Info("starting ingest", "config", c)
	ks, err := keys.Parse(c.APIKeys)
	if err != nil {
		return err
	}

	// Dependencies.
	nc, js, err := c.Base.Connect(ctx, log)
	if err != nil {
		return err
	}
	defer service.Drain(nc, c.ShutdownTimeout, log)
	reg := telemetry.NewRegistry()
	refusals, err := admission.Open(ctx, js, log)
	if err != nil {
		return err
	}
	defer refusals.Stop()
	// The destinations, to charge a tenant's rate by what its batches cost.
	dests, err := registry.OpenMeasured(ctx, js, log, reg)
	if err != nil {
		return err
	}
	defer dests.Stop()

	// Servers.
	srv, err := api.New(js, ks, refusals, api.Limits{
		MaxBatchBytes:       c.MaxBatchBytes,
		TenantRate:          c.TenantRate,
		TenantBurst:         c.TenantBurst,
		PublishTimeout:      c.PublishTimeout,
		MaxInflightBytes:    c.MaxInflightBytes,
		TenantInflightBytes: c.TenantInflightBytes,
		Fanout:              func(tenant string) int { return len(dests.ForTenant(tenant)) },
	}, log, reg)
	if err != nil {
		return err
	}
	gs, err := grpcserver.New(grpcserver.Options{
		// Auth and Admit run on the headers: a call is authenticated and
		// its memory reserved before gRPC reads its request.
		Log: log, Registry: reg, Auth: srv.Authenticate, Admit: srv.Admit,
		// Room for batches over the limit, so the handler can refuse them
		// with a clear InvalidArgument naming the limit; only grossly
		// oversized messages meet gRPC's own ResourceExhausted.
		MaxRecvMsgSize:       srv.MaxRecvMsgSize(),
		MaxConcurrentStreams: uint32(c.MaxConcurrentStreams),
	})
	if err != nil {
		return err
	}
	ingestv1.RegisterIngestServiceServer(gs.Server, srv)
	gs.Ready()

	comps := []service.Component{service.GRPC(gs, lis.GRPC, c.ShutdownTimeout), service.NATSHealth(nc, gs, log)}
	if lis.Metrics != nil {
		comps = append(comps, service.Metrics(telemetry.NewMetricsServer(lis.Metrics, reg), c.ShutdownTimeout))
		log.Info("ingest metrics", "addr", lis.Metrics.Addr().String())
	}
	log.Info("ingest serving", "grpc", lis.GRPC.Addr().String(), "tenants", ks.Tenants())

	// Shutdown: Run returns once every component has finished; the deferred
	// drain then flushes NATS.
	return service.RunAll(ctx, comps...)
}
