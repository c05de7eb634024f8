package registry

import (
	"context"
	"log/slog"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// RegisterMetrics exports each view's age (see ViewAge) on reg as
// bulkhead_registry_view_age_seconds{bucket}: an alarm when it grows past a
// few freshness intervals, since a stale view enforces old decisions.
func (r *Registry) RegisterMetrics(reg prometheus.Registerer) error {
	for kind, bucket := range map[Kind]string{DestinationChanged: topology.BucketDestinations, DecisionChanged: topology.BucketQuarantine} {
		g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "bulkhead_registry_view_age_seconds",
			Help:        "How long ago this process's view of a KV bucket was last known to hold everything in it.",
			ConstLabels: prometheus.Labels{"bucket": bucket},
		}, func() float64 { return r.ViewAge(kind).Seconds() })
		if err := reg.Register(g); err != nil {
			return err
		}
	}
	return nil
}

// OpenMeasured is Open, with the view's metrics registered on reg: what
// every service's wiring does.
func OpenMeasured(ctx context.Context, js jetstream.JetStream, log *slog.Logger, reg prometheus.Registerer) (*Registry, error) {
	r, err := Open(ctx, js, log)
	if err != nil {
		return nil, err
	}
	if err := r.RegisterMetrics(reg); err != nil {
		r.Stop()
		return nil, err
	}
	return r, nil
}
