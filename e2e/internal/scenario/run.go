package scenario

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
	"github.com/bulkhead-io/bulkhead/e2e/internal/report"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
)

// Live is one second of a running scenario, for a live status line.
type Live struct {
	// Elapsed since the run's start, and the phase then.
	Elapsed time.Duration
	Phase   string
	// Delivered impressions in the last second and their p99 latency, per
	// class (index report.Healthy, report.Failing).
	Delivered [2]uint64
	P99       [2]time.Duration
	// Quarantined destinations now (QUARANTINED or PROBING).
	Quarantined int
	// Backlog is accepted impressions not yet delivered.
	Backlog int64
}

// Options are a run's inputs beside the Config.
type Options struct {
	// System names the system in the report ("bulkhead", ...).
	System string
	// Target is the system under test.
	Target Target
	// Outage false keeps every destination healthy (the baseline).
	Outage bool
	// Recorder receives the latency samples (shared by the systems of one
	// benchmark so their timelines can be compared).
	Recorder *report.Recorder
	// Live, when set, is called once a second.
	Live func(Live)
	// Log receives progress (default: discarded).
	Log *slog.Logger
	// ExportAtHeal exports the failing destinations' parked impressions at
	// the heal, before replay empties PARKED, so parked impressions are
	// counted by key. It costs the system CPU during the recovery phase, so
	// a benchmark leaves it off when the target is a ParkCounter.
	ExportAtHeal bool
}

// Outcome is what a run measured beyond the recorder's latencies.
type Outcome struct {
	Result report.SystemResult
	// Scheduled impressions; Refused were not accepted after retries.
	Scheduled, Refused int64
	// SubmitLag is how late the generator sent batches (actual send minus
	// scheduled time); latencies are measured from the scheduled time.
	SubmitLag report.Latency
	// SubmitCall is how long accepting one batch took (the Submit call,
	// retries included).
	SubmitCall report.Latency
	// Quarantined maps failing destinations to the time from their onset
	// to their first quarantine; HealthyQuarantined counts healthy
	// destinations ever quarantined (should be 0).
	Quarantined        map[int]time.Duration
	HealthyQuarantined int
	// Drained maps failing destinations to the time from the heal to
	// their last backlog arrival, for those whose backlog was fully
	// delivered.
	Drained map[int]time.Duration
	// DrainWait is how long after the load the run waited for the last
	// accepted impression.
	DrainWait time.Duration
	// Elapsed is the run's length from the first scheduled submit to the
	// end of the drain.
	Elapsed time.Duration
	// ParkedByCounter says FailingResult.Parked comes from the system's own
	// counters (ParkCounter), not from exported keys; ParkedHealthy counts
	// impressions those counters parked for healthy destinations.
	ParkedByCounter bool
	ParkedHealthy   int64
	// BadKeys were arrivals the run did not schedule (should be 0).
	BadKeys int64
	// Fleet counts what the destinations saw.
	Fleet fleet.Stats
}

// Run runs the scenario once against opts.Target and returns what it
// measured. It starts and closes its own fleet. Every wait is bounded by the
// configuration's phase lengths plus fixed slack.
func Run(ctx context.Context, cfg Config, opts Options) (*Outcome, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	budget := cfg.Load() + cfg.DrainMax + 5*time.Minute
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()

	failing := cfg.Failing()
	prefix := map[bool]string{true: "o", false: "n"}[opts.Outage] + fmt.Sprintf("%x", time.Now().UnixNano()&0xffffff)
	tr := newTracker(cfg, opts.System, prefix, failing, opts.Recorder)
	fl, err := fleet.New(cfg.Destinations, fleet.Options{OnArrival: tr.arrival, SlowDelay: cfg.SlowDelay, FlapPeriod: cfg.FlapPeriod})
	if err != nil {
		return nil, err
	}
	defer func() { _ = fl.Close() }()
	urls := make([]string, cfg.Destinations)
	for i := range urls {
		urls[i] = fl.URL(i)
	}
	setupStart := time.Now()
	if err := opts.Target.Setup(ctx, cfg, urls); err != nil {
		return nil, fmt.Errorf("setup %s: %w", opts.System, err)
	}
	log.Info("destinations created", "system", opts.System, "n", cfg.Destinations, "took", time.Since(setupStart).Round(time.Millisecond))

	out := &Outcome{Quarantined: map[int]time.Duration{}, Drained: map[int]time.Duration{}}
	start := time.Now().Add(time.Second).Round(time.Second)
	tr.start = start

	// Quarantine decisions, from the first one the monitor makes.
	var qmu sync.Mutex
	firstQuarantine := map[int]time.Time{}
	state := map[int]eventv1.State{}
	onset := map[int]time.Time{}
	var bg sync.WaitGroup
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer func() { stopWatch(); bg.Wait() }()
	if q, ok := opts.Target.(Quarantiner); ok {
		bg.Go(func() {
			_ = q.WatchQuarantine(watchCtx, func(i int, s eventv1.State, at time.Time) {
				qmu.Lock()
				defer qmu.Unlock()
				state[i] = s
				if s == eventv1.State_STATE_QUARANTINED {
					if _, seen := firstQuarantine[i]; !seen {
						firstQuarantine[i] = at
					}
				}
			})
		})
	}
	quarantinedNow := func() int {
		qmu.Lock()
		defer qmu.Unlock()
		n := 0
		for _, s := range state {
			if s == eventv1.State_STATE_QUARANTINED || s == eventv1.State_STATE_PROBING {
				n++
			}
		}
		return n
	}

	// The outage: switch the failing destinations at onset, heal them at
	// the heal time. Each destination's onset is taken just before its
	// switch.
	if opts.Outage {
		bg.Go(func() {
			if !sleepUntil(watchCtx, start.Add(cfg.OnsetAt())) {
				return
			}
			for i, b := range failing {
				if b == fleet.Healthy {
					continue
				}
				qmu.Lock()
				onset[i] = time.Now()
				qmu.Unlock()
				if err := fl.Set(i, b); err != nil {
					log.Error("outage onset", "dest", i, "err", err)
				}
			}
			log.Info("outage onset", "system", opts.System, "took", time.Since(start.Add(cfg.OnsetAt())).Round(time.Millisecond))
			if !sleepUntil(watchCtx, start.Add(cfg.HealAt())) {
				return
			}
			for i, b := range failing {
				if b != fleet.Healthy {
					if err := fl.Set(i, fleet.Healthy); err != nil {
						log.Error("heal", "dest", i, "err", err)
					}
				}
			}
			log.Info("healed", "system", opts.System)
			// What the outage parked, exported at the heal, before any
			// probe can start a replay that empties PARKED again.
			if p, ok := opts.Target.(Parker); ok && opts.ExportAtHeal {
				for i, b := range failing {
					if b == fleet.Healthy {
						continue
					}
					pctx, pcancel := context.WithTimeout(watchCtx, 30*time.Second)
					if err := p.Parked(pctx, i, func(key string) { tr.park(key) }); err != nil {
						log.Warn("export parked at heal", "dest", i, "err", err)
					}
					pcancel()
				}
				log.Info("parked exported at heal", "system", opts.System, "took", time.Since(start.Add(cfg.HealAt())).Round(time.Millisecond))
			}
		})
	}

	// Live status once a second until the run ends.
	if opts.Live != nil {
		bg.Go(func() {
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-watchCtx.Done():
					return
				case now := <-t.C:
					h := tr.live.take()
					l := Live{Elapsed: now.Sub(start), Phase: cfg.PhaseAt(now.Sub(start)), Quarantined: quarantinedNow(),
						Backlog: tr.nAccepted.Load() - tr.nDelivered.Load()}
					for c := range h {
						l.Delivered[c], l.P99[c] = h[c].Count(), h[c].Quantile(0.99)
					}
					opts.Live(l)
				}
			}
		})
	}

	// The load: open loop; every batch has its scheduled time, and a late
	// send is still measured from it.
	lag, call, scheduled, refused := generate(ctx, cfg, opts.Target, tr, start)
	out.Scheduled, out.Refused, out.SubmitLag, out.SubmitCall = scheduled, refused, lag.Latency(), call.Latency()
	loadEnd := start.Add(cfg.Load())
	log.Info("load done", "system", opts.System, "accepted", tr.nAccepted.Load(), "refused", refused,
		"submit_lag_p99", lag.Quantile(0.99).Round(time.Millisecond))

	// The drain: until everything accepted arrived, or DrainMax.
	drainEnd := time.Now().Add(cfg.DrainMax)
	for tr.nDelivered.Load() < tr.nAccepted.Load() && time.Now().Before(drainEnd) && ctx.Err() == nil {
		sleepUntil(ctx, time.Now().Add(100*time.Millisecond))
	}
	out.DrainWait = max(time.Since(loadEnd), 0)
	out.Elapsed = time.Since(start)
	log.Info("drain done", "system", opts.System, "waited", out.DrainWait.Round(time.Millisecond),
		"undelivered", tr.nAccepted.Load()-tr.nDelivered.Load())

	// Parked impressions, for every destination (a healthy one should have
	// none).
	if p, ok := opts.Target.(Parker); ok {
		for i := range cfg.Destinations {
			pctx, pcancel := context.WithTimeout(ctx, time.Minute)
			err := p.Parked(pctx, i, func(key string) { tr.park(key) })
			pcancel()
			if err != nil {
				return nil, err
			}
		}
	}
	stopWatch()
	bg.Wait()

	// Accounting.
	c := tr.count()
	res := report.SystemResult{
		Name: opts.System, Accepted: c.accepted, Delivered: c.delivered, Parked: c.parkedOnly,
		Lost: c.lost, Duplicates: tr.nDup.Load(),
	}
	if last := tr.lastArrival.Load(); last > 0 {
		if span := time.Unix(0, last).Sub(start); span > 0 {
			res.ThroughputPerSec = float64(c.delivered) / span.Seconds()
		}
	}
	out.BadKeys = tr.nBad.Load()
	out.Fleet = fl.Total()

	if opts.Outage && cfg.FailingShare > 0 {
		f := &report.FailingResult{Parked: c.parkedFailing}
		if pc, ok := opts.Target.(ParkCounter); ok && !opts.ExportAtHeal {
			pctx, pcancel := context.WithTimeout(ctx, 30*time.Second)
			byDest, err := pc.ParkedImpressions(pctx)
			pcancel()
			if err != nil {
				log.Warn("parked counters", "err", err)
			}
			f.Parked, out.ParkedByCounter = 0, true
			for i, n := range byDest {
				if failing[i] != fleet.Healthy {
					f.Parked += n
				} else {
					out.ParkedHealthy += n
				}
			}
		}
		var toQ, drained []time.Duration
		heal := start.Add(cfg.HealAt())
		qmu.Lock()
		for i, b := range failing {
			if b == fleet.Healthy {
				if _, q := firstQuarantine[i]; q {
					out.HealthyQuarantined++
				}
				continue
			}
			f.Destinations++
			if at, q := firstQuarantine[i]; q && !onset[i].IsZero() {
				d := max(at.Sub(onset[i]), 0)
				out.Quarantined[i] = d
				toQ = append(toQ, d)
			}
			if !c.undrained[i] {
				d := max(time.Unix(0, tr.backlogLast[i].Load()).Sub(heal), 0)
				out.Drained[i] = d
				drained = append(drained, d)
			}
		}
		qmu.Unlock()
		f.OnsetToQuarantine = report.NewSpread(toQ)
		f.HealToDrained = report.NewSpread(drained)
		res.Failing = f
	}
	out.Result = res
	return out, nil
}

// generate submits the schedule from start, open loop, and returns the
// send-lag histogram, the number of impressions scheduled and the number
// refused. A scheduler queues every tenant's batch at its time; Senders
// goroutines send them. A batch refused with a retryable code is retried
// with its idempotency key for up to 5 s.
func generate(ctx context.Context, cfg Config, tgt Target, tr *tracker, start time.Time) (lag, call report.Histogram, scheduled, refused int64) {
	type job struct{ i, k int }
	jobs := make(chan job, 1<<16)
	var (
		mu      sync.Mutex
		senders sync.WaitGroup
	)
	for range cfg.Senders {
		senders.Go(func() {
			var myLag, myCall report.Histogram
			var myRefused int64
			for jb := range jobs {
				n := cfg.count(jb.i, jb.k)
				due := start.Add(cfg.offset(jb.i, jb.k))
				myLag.Record(time.Since(due))
				items := make([]*ingestv1.Impression, n)
				for j := range n {
					items[j] = impression(tr.key(jb.i, jb.k, j), due)
				}
				t0 := time.Now()
				ok := submit(ctx, tgt, jb.i, tr.key(jb.i, jb.k, 0), items)
				myCall.Record(time.Since(t0))
				if ok {
					tr.accept(jb.i, jb.k, n)
				} else {
					myRefused += int64(n)
				}
			}
			mu.Lock()
			lag.Merge(&myLag)
			call.Merge(&myCall)
			refused += myRefused
			mu.Unlock()
		})
	}
	for k := range cfg.ticks() {
		for s := range slots {
			if !sleepUntil(ctx, start.Add(time.Duration(k)*cfg.Interval+time.Duration(s)*cfg.Interval/slots)) {
				break
			}
			for i := s; i < cfg.Destinations; i += slots {
				if n := cfg.count(i, k); n > 0 {
					scheduled += int64(n)
					jobs <- job{i, k}
				}
			}
		}
	}
	close(jobs)
	senders.Wait()
	return lag, call, scheduled, refused
}

// submit sends a batch, retrying retryable refusals for up to 5 s.
func submit(ctx context.Context, tgt Target, tenant int, idem string, items []*ingestv1.Impression) bool {
	deadline := time.Now().Add(5 * time.Second)
	wait := 50 * time.Millisecond
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := tgt.Submit(cctx, tenant, idem, items)
		cancel()
		if err == nil {
			return true
		}
		switch status.Code(err) {
		case codes.ResourceExhausted, codes.Unavailable, codes.DeadlineExceeded, codes.Aborted:
		default:
			return false
		}
		if time.Now().Add(wait).After(deadline) || !sleepUntil(ctx, time.Now().Add(wait)) {
			return false
		}
		wait *= 2
	}
}

// impression is a realistic impression with the given key.
func impression(key string, at time.Time) *ingestv1.Impression {
	return &ingestv1.Impression{
		Key: key, Split: "new_checkout", EnvironmentId: "env-1", EnvironmentName: "prod", Treatment: "on",
		Time: at.UnixMilli(), BucketingKey: key, Label: "default rule", MachineName: "host-7",
		MachineIp: "10.0.0.7", SplitVersionNumber: 1699999999999, Sdk: "go", SdkVersion: "6.4.0", Properties: "{}",
	}
}

// sleepUntil waits until t or ctx's end; false means ctx ended.
func sleepUntil(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-tm.C:
		return true
	}
}
