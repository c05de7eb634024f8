package engine

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	leader    prometheus.Gauge
	outcomes  prometheus.Counter
	decisions *prometheus.CounterVec
	probes    *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bulkhead_monitor_leader", Help: "1 while this replica holds the monitor lease and makes decisions.",
		}),
		outcomes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bulkhead_monitor_outcomes_total", Help: "Delivery outcomes observed.",
		}),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_monitor_decisions_total", Help: "Decisions stored, by state.",
		}, []string{"state"}),
		probes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_monitor_probes_total", Help: "Probes of quarantined destinations, by result.",
		}, []string{"result"}),
	}
	for _, c := range []prometheus.Collector{m.leader, m.outcomes, m.decisions, m.probes} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
