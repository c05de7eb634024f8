package engine

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	leader    prometheus.Gauge
	outcomes  prometheus.Counter
	decisions *prometheus.CounterVec
	probes    *prometheus.CounterVec
	backlog   prometheus.Gauge
	stalled   prometheus.Gauge
	stalls    prometheus.Counter

	parkedAge     *prometheus.GaugeVec
	parkedBatches prometheus.Gauge
	parkedOldest  prometheus.Gauge

	overBudget prometheus.Gauge
	refused    *prometheus.GaugeVec
	refusals   *prometheus.CounterVec
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
		backlog: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bulkhead_monitor_delivery_backlog_batches", Help: "Batches waiting in DELIVERY, all destinations together.",
		}),
		stalled: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bulkhead_monitor_destinations_stalled",
			Help: "Destinations whose DELIVERY backlog has not moved for the stall period: a Bulkhead fault (alarm when above 0).",
		}),
		stalls: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bulkhead_monitor_stalls_total", Help: "Times a destination's backlog was found stalled.",
		}),
		parkedAge: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "bulkhead_monitor_parked_oldest_age_seconds",
			Help: "Age of a destination's oldest parked batch; only destinations with parked data have a series. Alarm well before the export window.",
		}, []string{"destination"}),
		parkedBatches: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bulkhead_monitor_parked_batches", Help: "Batches in PARKED, all destinations together.",
		}),
		parkedOldest: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bulkhead_monitor_parked_oldest_age_max_seconds", Help: "Age of the oldest parked batch of any destination.",
		}),
	}
	m.overBudget = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "bulkhead_monitor_destinations_over_budget",
		Help: "Destinations whose DELIVERY backlog is at its budget, so their new batches are parked.",
	})
	m.refused = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "bulkhead_monitor_tenants_refused",
		Help: "Tenants ingest refuses because a budget is spent, by reason (on the leader; alarm when above 0).",
	}, []string{"reason"})
	m.refusals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "bulkhead_monitor_refusals_total", Help: "Tenants refused at ingest, by reason.",
	}, []string{"reason"})
	for _, c := range []prometheus.Collector{m.overBudget, m.refused, m.refusals, m.parkedAge, m.parkedBatches, m.parkedOldest, m.backlog, m.stalled, m.stalls, m.leader, m.outcomes, m.decisions, m.probes} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
