package fanout

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	batches     *prometheus.CounterVec
	impressions *prometheus.CounterVec
	latency     prometheus.Histogram
	full        prometheus.Counter
	overBudget  prometheus.Counter
	viewBehind  prometheus.Counter
	pending     prometheus.Gauge
	ackPending  prometheus.Gauge
	repulls     *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_router_batches_total", Help: "Accepted batches handled, by result (routed, partial: some outputs handed back, retry, corrupt).",
		}, []string{"result"}),
		impressions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_router_impressions_total", Help: "Impressions routed, by destination and action (deliver, park).",
		}, []string{"destination", "action"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "bulkhead_router_route_seconds", Help: "Time from receiving a batch to all its outputs stored (the destination-view check included).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		full: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bulkhead_router_stream_full_total", Help: "Outputs refused because DELIVERY or PARKED, or the destination's share of it, was full (alarm).",
		}),
		overBudget: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bulkhead_router_over_budget_total", Help: "Outputs parked because their destination's DELIVERY backlog was at its budget.",
		}),
		viewBehind: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bulkhead_router_view_behind_total", Help: "Batches handed back because the destination view could not be confirmed current (alarm if it keeps rising).",
		}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bulkhead_router_consumer_pending", Help: "Accepted batches not yet pulled by any router (lag).",
		}),
		ackPending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bulkhead_router_consumer_ack_pending", Help: "Batches pulled but not yet acknowledged.",
		}),
		repulls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_router_repulls_total",
			Help: "Router pulls sent again, by cause: heartbeat (a pull the server dropped), closed (the subscription ended and was replaced).",
		}, []string{"cause"}),
	}
	for _, c := range []prometheus.Collector{m.repulls, m.batches, m.impressions, m.latency, m.full, m.overBudget, m.viewBehind, m.pending, m.ackPending} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
