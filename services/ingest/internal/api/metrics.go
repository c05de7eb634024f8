package api

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	impressions *prometheus.CounterVec
	refusedImps *prometheus.CounterVec
	batches     *prometheus.CounterVec
	publish     prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		impressions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_ingest_impressions_accepted_total", Help: "Impressions stored in JetStream, by tenant.",
		}, []string{"tenant"}),
		refusedImps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_ingest_impressions_refused_total", Help: "Impressions refused, by tenant and reason.",
		}, []string{"tenant", "reason"}),
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_ingest_batches_total", Help: "Batches stored, by result (stored, duplicate).",
		}, []string{"result"}),
		publish: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "bulkhead_ingest_publish_seconds", Help: "Time for JetStream to store a batch.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
	}
	for _, c := range []prometheus.Collector{m.impressions, m.refusedImps, m.batches, m.publish} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *metrics) refused(tenant, reason string, n int) {
	m.refusedImps.WithLabelValues(tenant, reason).Add(float64(n))
}
