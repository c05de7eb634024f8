// Package monitor wires the health monitor: the decision engine (outcomes,
// quarantine, probes, recovery; active on the lease holder only) and the
// AdminService (on every replica). main and the dev stack start it with Serve
// (listening where it is configured to); tests and the e2e stack with Run
// (on listeners they opened).
package monitor

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"strconv"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
	"github.com/bulkhead-io/bulkhead/pkg/conf"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/pkg/netguard"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/service"
	"github.com/bulkhead-io/bulkhead/pkg/telemetry"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/admin"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/budget"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/engine"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/health"
)

// EnvPrefix prefixes the environment variables of this service.
const EnvPrefix = "BULKHEAD_MONITOR"

// Config is the monitor's configuration.
type Config struct {
	service.Base
	// AdminAddr serves the AdminService.
	AdminAddr string
	// AdminTokens are "name:token:role" triples (role read or operator).
	AdminTokens conf.StringList
	// AllowNets are CIDRs destinations may use although private.
	AllowNets conf.StringList
	Engine    engine.Config
	Defaults  admin.Defaults
}

// Flags registers the configuration's flags on fs and returns it with defaults.
func Flags(fs *flag.FlagSet) *Config {
	c := &Config{}
	c.Base.RegisterFlags(fs, "monitor", "127.0.0.1:7413")
	c.Base.RegisterStreamFlags(fs) // the monitor owns the streams' configuration
	fs.StringVar(&c.AdminAddr, "admin-addr", "127.0.0.1:7401", "address of the AdminService")
	fs.Var(&c.AdminTokens, "admin-tokens", "comma-separated name:token:role triples, role read or operator")
	fs.Var(&c.AllowNets, "allow-nets", "CIDRs destinations may use although private, comma-separated (e.g. 127.0.0.0/8)")
	p := health.DefaultPolicy()
	c.Engine.Policy = p
	e := &c.Engine.Policy
	fs.IntVar(&e.ConsecutiveFailures, "quarantine-consecutive", p.ConsecutiveFailures, "quarantine after this many failures in a row")
	fs.Float64Var(&e.ErrorRate, "quarantine-error-rate", p.ErrorRate, "quarantine at this error rate over the window...")
	fs.IntVar(&e.MinAttempts, "quarantine-min-attempts", p.MinAttempts, "...once the window holds this many attempts")
	fs.IntVar(&e.MinUnreachable, "quarantine-unreachable", p.MinUnreachable, "quarantine after this many timeouts/refusals in the recent window (when they dominate it)")
	fs.DurationVar(&e.Window, "window", p.Window, "sliding window span")
	fs.DurationVar(&e.ProbeInitial, "probe-initial", p.ProbeInitial, "wait from quarantine to the first probe")
	fs.DurationVar(&e.ProbeMax, "probe-max", p.ProbeMax, "ceiling of the doubling probe backoff")
	fs.DurationVar(&e.ProbeTimeout, "probe-timeout", p.ProbeTimeout, "a probe without result this long counts as failed (e.g. its monitor died)")
	fs.BoolVar(&e.Domain.Enabled, "failure-domains", p.Domain.Enabled, "quarantine a failure domain (host, /24) as a whole when several of its destinations fail together")
	fs.IntVar(&e.Domain.MinTenants, "failure-domain-tenants", p.Domain.MinTenants, "a failure domain's trip holds other tenants' destinations there only when this many tenants' destinations tripped")
	fs.BoolVar(&c.Engine.Disabled, "no-quarantine", false, "observe only: never quarantine automatically (experiments)")
	fs.DurationVar(&c.Engine.StallAfter, "stall-after", engine.DefaultStallAfter, "report a destination stalled when its DELIVERY backlog has not moved this long (at least 3 request timeouts)")
	c.Engine.Budgets = budget.DefaultLimits()
	b := &c.Engine.Budgets
	fs.Int64Var(&b.TenantParked, "tenant-parked-budget", b.TenantParked, "parked batches a tenant may hold over all its destinations before ingest refuses it (0: no limit)")
	fs.Float64Var(&b.HighWater, "parked-high-water", b.HighWater, "refuse a tenant once one of its destinations holds this fraction of -destination-parked-batches")
	fs.Float64Var(&b.Pressure, "store-pressure", b.Pressure, "when a shared stream is this full (fraction of its bytes), refuse the tenants holding more than an equal share of it (0: off)")
	fs.StringVar(&c.Engine.Holder, "replica-id", service.ReplicaID(), "this replica's name in the leadership lease")
	// The destination defaults live in registry; these flags change what
	// the admin API stores into new destinations.
	c.Defaults = admin.Defaults{Destination: registry.DefaultDestination(), ReplayRate: 500}
	dd := &c.Defaults.Destination
	fs.Func("batch-max-impressions", fmt.Sprintf("default impressions per POST for new destinations (%d)", dd.MaxBatchImpressions), func(s string) error {
		n, err := strconv.ParseInt(s, 10, 32)
		dd.MaxBatchImpressions = int32(n)
		return err
	})
	fs.Func("batch-max-bytes", fmt.Sprintf("default body bytes per POST for new destinations (%d)", dd.MaxBatchBytes), func(s string) error {
		n, err := strconv.ParseInt(s, 10, 32)
		dd.MaxBatchBytes = int32(n)
		return err
	})
	fs.DurationVar(&dd.Linger, "batch-linger", dd.Linger, "default linger for new destinations")
	fs.DurationVar(&dd.Timeout, "request-timeout", dd.Timeout, "default request timeout for new destinations")
	fs.Float64Var(&c.Defaults.ReplayRate, "replay-rate", c.Defaults.ReplayRate, "ReplayParked's rate (batches/s) when the caller gives none")
	return c
}

// ParseConfig reads flags and BULKHEAD_MONITOR_* variables, then validates.
func ParseConfig(args []string) (*Config, error) {
	return service.Parse("monitor", EnvPrefix, Flags, args)
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if err := c.Base.Validate(); err != nil {
		return err
	}
	if _, err := admin.ParseTokens(c.AdminTokens); err != nil {
		return err
	}
	if _, err := netguard.NewPolicy(c.AllowNets); err != nil {
		return err
	}
	if c.Engine.Holder == "" {
		return errors.New("replica-id is required")
	}
	if dd := c.Defaults.Destination; dd.MaxBatchImpressions < 1 || dd.MaxBatchBytes < 1 || dd.Linger < 0 || dd.Timeout <= 0 || c.Defaults.ReplayRate <= 0 {
		return errors.New("destination defaults must be positive")
	}
	if b := c.Engine.Budgets; b.TenantParked < 0 || b.HighWater < 0 || b.HighWater > 1 || b.Pressure < 0 || b.Pressure > 1 {
		return errors.New("tenant-parked-budget must be ≥ 0, parked-high-water and store-pressure within 0..1")
	}
	return c.Engine.Policy.Validate()
}

// LogValue logs the configuration with tokens masked.
func (c *Config) LogValue() slog.Value {
	masked := make([]string, len(c.AdminTokens))
	for i, t := range c.AdminTokens {
		masked[i] = conf.Mask(t)
	}
	return slog.GroupValue(slog.Any("base", c.Base), slog.String("admin_addr", c.AdminAddr),
		slog.Any("admin_tokens", masked), slog.Any("allow_nets", c.AllowNets),
		slog.Bool("quarantine", !c.Engine.Disabled), slog.String("replica", c.Engine.Holder))
}

// Listeners are where the service serves; tests pass :0 listeners.
type Listeners struct {
	Admin   net.Listener
	Metrics net.Listener // nil: no metrics server
}

// Serve opens the configured listeners and runs until ctx ends.
func Serve(ctx context.Context, c *Config, log *slog.Logger) error {
	a, err := service.Listen(c.AdminAddr)
	if err != nil {
		return err
	}
	m, err := service.Listen(c.MetricsAddr)
	if err != nil {
		_ = a.Close()
		return err
	}
	return Run(ctx, c, log, Listeners{Admin: a, Metrics: m})
}

// Run runs the monitor until ctx ends, then stops the engine (giving up the
// lease at once), finishes admin calls in flight and drains NATS.
func Run(ctx context.Context, c *Config, log *slog.Logger, lis Listeners) error {
	log.Info("starting monitor", "config", c)
	tokens, err := admin.ParseTokens(c.AdminTokens)
	if err != nil {
		return err
	}
	policy, err := netguard.NewPolicy(c.AllowNets)
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
	client := webhook.NewClient(policy, webhook.ClientOptions{})
	defer client.CloseIdleConnections()
	view, err := registry.OpenMeasured(ctx, js, log, reg)
	if err != nil {
		return err
	}
	defer view.Stop()
	refusals, err := admission.Open(ctx, js, log)
	if err != nil {
		return err
	}
	defer refusals.Stop()
	eng, err := engine.New(ctx, js, view, refusals, client, c.Engine, log, reg)
	if err != nil {
		return err
	}

	// Servers.
	srv, err := admin.New(ctx, js, policy, tokens, c.Defaults, eng, log)
	if err != nil {
		return err
	}
	gs, err := grpcserver.New(grpcserver.Options{Log: log, Registry: reg, Auth: srv.Authenticate})
	if err != nil {
		return err
	}
	adminv1.RegisterAdminServiceServer(gs.Server, srv)
	gs.Ready()

	comps := []service.Component{
		service.GRPC(gs, lis.Admin, c.ShutdownTimeout),
		service.NATSHealth(nc, gs, log),
		{Name: "engine", Run: eng.Run},
	}
	if lis.Metrics != nil {
		comps = append(comps, service.Metrics(telemetry.NewMetricsServer(lis.Metrics, reg), c.ShutdownTimeout))
		log.Info("monitor metrics", "addr", lis.Metrics.Addr().String())
	}
	log.Info("monitor serving", "admin", lis.Admin.Addr().String())
	return service.RunAll(ctx, comps...)
}
