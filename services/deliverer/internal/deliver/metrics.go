package deliver

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bulkhead-io/bulkhead/pkg/webhook"
)

type metrics struct {
	attempts        *prometheus.CounterVec
	latency         *prometheus.HistogramVec
	delivered       *prometheus.CounterVec
	parked          *prometheus.CounterVec
	retries         *prometheus.CounterVec
	retriesDeferred prometheus.Counter
	replaysDeferred prometheus.Counter
	pending         *prometheus.GaugeVec
	inflight        *prometheus.GaugeVec
	capacity        *prometheus.GaugeVec
	queued          *prometheus.GaugeVec
	inflightTotal   prometheus.Gauge
	parkFailed      prometheus.Counter
	outcomeLost     prometheus.Counter
	resubscribed    *prometheus.CounterVec
	oldest          *prometheus.GaugeVec
	oldestMax       prometheus.Gauge
	hung            prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	dest := []string{"destination"}
	m := &metrics{
		replaysDeferred: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bulkhead_deliverer_replays_deferred_total", Help: "Replayed batches held back because replays already used their share of the workers.",
		}),
		hung: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bulkhead_deliverer_hung_total",
			Help: "Times a destination's requests went unanswered far beyond its usual latency and its in-flight cap was cut to one.",
		}),
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_deliverer_attempts_total", Help: "POST attempts, by destination and result (ok or an error class).",
		}, []string{"destination", "result"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "bulkhead_deliverer_attempt_seconds", Help: "POST attempt latency, by destination.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, dest),
		delivered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_deliverer_impressions_delivered_total", Help: "Impressions delivered (2xx), by destination.",
		}, dest),
		parked: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_deliverer_impressions_parked_total", Help: "Impressions moved to PARKED, by destination and reason.",
		}, []string{"destination", "reason"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_deliverer_retries_total", Help: "Batches scheduled for another attempt, by destination.",
		}, dest),
		retriesDeferred: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bulkhead_deliverer_retries_deferred_total", Help: "Retries held back because retries already used their share of the workers.",
		}),
		pending: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "bulkhead_deliverer_pending", Help: "Batches waiting in DELIVERY not yet pulled (lag), by destination.",
		}, dest),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "bulkhead_deliverer_inflight", Help: "POSTs in flight, by destination.",
		}, dest),
		capacity: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "bulkhead_deliverer_inflight_cap", Help: "Adaptive in-flight cap, by destination.",
		}, dest),
		queued: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "bulkhead_deliverer_queued", Help: "Batches ready and waiting for a worker, by destination.",
		}, dest),
		inflightTotal: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bulkhead_deliverer_workers_busy", Help: "Workers currently POSTing.",
		}),
		parkFailed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bulkhead_deliverer_park_failures_total", Help: "Messages that could not be parked and were handed back (alarm).",
		}),
		outcomeLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bulkhead_deliverer_outcomes_unpublished_total", Help: "Outcomes the monitor will not see.",
		}),
		resubscribed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_deliverer_lane_repulls_total",
			Help: "Lane pull subscriptions renewed, by cause: heartbeat (a pull the server dropped), starving (backlog, no pull outstanding), closed, failed. A steady rate means NATS keeps losing pulls.",
		}, []string{"cause"}),
		oldest: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "bulkhead_deliverer_oldest_undelivered_seconds",
			Help: "Age of the oldest batch still in DELIVERY, by destination; only destinations with a backlog have a series.",
		}, dest),
		oldestMax: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bulkhead_deliverer_oldest_undelivered_max_seconds",
			Help: "Age of the oldest batch still in DELIVERY over all destinations: how far behind the worst destination is.",
		}),
	}
	for _, c := range []prometheus.Collector{m.replaysDeferred, m.hung, m.resubscribed, m.oldest, m.oldestMax, m.attempts, m.latency, m.delivered, m.parked, m.retries, m.retriesDeferred, m.pending,
		m.inflight, m.capacity, m.queued, m.inflightTotal, m.parkFailed, m.outcomeLost} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *metrics) observe(dest string, res webhook.Result) {
	result := "ok"
	if !res.OK() {
		result = res.Class.String()
	}
	m.attempts.WithLabelValues(dest, result).Inc()
	m.latency.WithLabelValues(dest).Observe(res.Latency.Seconds())
}
