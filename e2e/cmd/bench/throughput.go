package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
	"github.com/bulkhead-io/bulkhead/e2e/internal/repo"
	"github.com/bulkhead-io/bulkhead/e2e/internal/report"
	"github.com/bulkhead-io/bulkhead/e2e/internal/scenario"
)

// step is one offered rate of the throughput search.
type step struct {
	Offered      float64        `json:"offered_per_s"`
	Delivered    float64        `json:"delivered_per_s"`
	Latency      report.Latency `json:"latency"`
	SubmitLagP99 float64        `json:"submit_lag_p99_ms"`
	Refused      int64          `json:"refused"`
	Lost         int64          `json:"lost"`
	Undelivered  int64          `json:"undelivered"`
	PerPOST      float64        `json:"impressions_per_post"`
	CPUSeconds   float64        `json:"cpu_seconds"`
	PeakRSS      int64          `json:"peak_rss_bytes"`
	Pass         bool           `json:"pass"`
	Why          string         `json:"why,omitempty"`
	Profile      string         `json:"profile,omitempty"`
}

type throughputJSON struct {
	Destinations int         `json:"destinations"`
	P99MaxMs     float64     `json:"p99_max_ms"`
	Steps        []step      `json:"steps"`
	Best         float64     `json:"impressions_per_s"`
	Floor        floorResult `json:"floor"`
	Ratio        float64     `json:"ratio"`
	Machine      string      `json:"machine"`
	Notes        []string    `json:"notes"`
}

// runThroughput raises the offered rate step by step (a fresh Bulkhead per
// step, all destinations healthy) until p99 exceeds the bound or the
// pipeline stops keeping up, then measures the floor relay on the same
// machine and reports the best passing rate as a ratio of the floor's.
func runThroughput(ctx context.Context, log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("throughput", flag.ContinueOnError)
	def := scenario.Default()
	def.Destinations, def.FailingShare = 20, 0
	def.Warmup, def.Steady, def.Outage, def.Recovery, def.DrainMax = 5*time.Second, 20*time.Second, 0, 0, 30*time.Second
	def.Rate = 20000
	var c common
	c.register(fs, def)
	factor := fs.Float64("rate-factor", 1.4, "each step offers this much more than the previous")
	steps := fs.Int("steps", 8, "most steps")
	p99Max := fs.Duration("p99-max", 2*time.Second, "a step passes when the steady p99 stays under this")
	floorBatch := fs.Int("floor-batch", 0, "impressions per floor POST (0: the pipeline's mean per POST at its best step)")
	floorWorkers := fs.Int("floor-workers", 16, "floor relay HTTP workers")
	floorDur := fs.Duration("floor-duration", 20*time.Second, "floor relay measuring window")
	profile := fs.Duration("profile", 10*time.Second, "CPU profile of Bulkhead taken during each step's steady phase (0: none)")
	outDir := fs.String("out", "docs/bench", "report directory (relative to the repository root)")
	name := fs.String("name", "throughput", "base name of the report files")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c.cfg.FailingShare = 0
	bin, cleanup, err := c.prepare(ctx, log)
	if err != nil {
		return err
	}
	defer cleanup()

	out := throughputJSON{Destinations: c.cfg.Destinations, P99MaxMs: float64(*p99Max) / 1e6,
		Machine: fmt.Sprintf("%d CPUs, %s", runtime.NumCPU(), runtime.Version())}
	var best *step
	rate := c.cfg.Rate
	for n := range *steps {
		cc := c
		cc.cfg.Rate = rate
		// Keep each tenant batch within a Submit's 1,000 impressions.
		for cc.cfg.Rate*cc.cfg.Interval.Seconds()/float64(cc.cfg.Destinations) > 1000 {
			cc.cfg.Interval /= 2
		}
		cc.workdir = filepath.Join(c.workdir, fmt.Sprintf("step-%d", n))
		st, err := throughputStep(ctx, log, &cc, bin, *p99Max, *profile)
		if err != nil {
			return err
		}
		log.Info("throughput step", "offered", rate, "delivered", st.Delivered, "p99_ms", st.Latency.P99Ms, "pass", st.Pass, "why", st.Why)
		out.Steps = append(out.Steps, *st)
		if !st.Pass {
			break
		}
		best = &out.Steps[len(out.Steps)-1]
		rate *= *factor
	}
	if best != nil {
		out.Best = best.Delivered
	}

	// The floor relay, on a fresh process's NATS, to a fresh fleet.
	batch := *floorBatch
	if batch == 0 {
		batch = 100
		if best != nil && best.PerPOST >= 1 {
			batch = int(best.PerPOST + 0.5)
		}
	}
	ch, err := startChild(ctx, bin, filepath.Join(c.workdir, "floor"), 1, c.env)
	if err != nil {
		return err
	}
	bh, err := scenario.NewBulkhead(ch.IngestAddr, ch.AdminAddr, adminToken, 1)
	if err == nil {
		rctx, cancel := context.WithTimeout(ctx, time.Minute)
		err = bh.Ready(rctx)
		cancel()
		_ = bh.Close()
	}
	if err != nil {
		_ = ch.Stop()
		return err
	}
	fl, err := fleet.New(c.cfg.Destinations, fleet.Options{OnArrival: func(fleet.Arrival) {}})
	if err != nil {
		_ = ch.Stop()
		return err
	}
	fr, err := floorRelay(ctx, ch.NATSURL, fl, batch, *floorWorkers, 3*time.Second, *floorDur)
	_ = fl.Close()
	_ = ch.Stop()
	if err != nil {
		return err
	}
	out.Floor = fr
	if fr.ImpressionsPerSec > 0 {
		out.Ratio = out.Best / fr.ImpressionsPerSec
	}
	out.Notes = []string{
		"Pipeline: gRPC Submit (this process, one tenant per destination) → ingest → IMPRESSIONS → router → DELIVERY (one consumer per destination) → deliverer → signed HTTP POST → fleet (this process); Bulkhead is one dev stack process.",
		"A step passes when the steady phase's p99 (scheduled submit → 2xx) is under the bound, nothing is refused or lost, and everything accepted is delivered by the end of the drain.",
		"Floor relay: one publisher keeps a file-backed work-queue stream full of ready webhook bodies; one pull consumer feeds HTTP workers that POST each body (signed) to the same kind of fleet and ack after the 2xx. Same NATS build, same machine, same sink.",
	}

	root, err := repo.Root()
	if err != nil {
		return err
	}
	dir := *outDir
	if !filepath.IsAbs(dir) {
		dir = filepath.Join(root, dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var md bytes.Buffer
	fmt.Fprintf(&md, "# Throughput: %d healthy destinations\n\n%s. Offered rate raised ×%.1f per step (%v warm-up, %v measured); pass = steady p99 < %v, nothing refused, lost or left undelivered.\n\n",
		c.cfg.Destinations, out.Machine, *factor, c.cfg.Warmup, c.cfg.Steady, *p99Max)
	fmt.Fprintf(&md, "| offered/s | delivered/s | p50 | p99 | max | submit lag p99 | impressions/POST | CPU | peak RSS | pass |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, s := range out.Steps {
		pass := "yes"
		if !s.Pass {
			pass = "no: " + s.Why
		}
		fmt.Fprintf(&md, "| %.0f | %.0f | %.0f ms | %.0f ms | %.0f ms | %.0f ms | %.0f | %.1f s | %.0f MiB | %s |\n",
			s.Offered, s.Delivered, s.Latency.P50Ms, s.Latency.P99Ms, s.Latency.MaxMs, s.SubmitLagP99, s.PerPOST, s.CPUSeconds, float64(s.PeakRSS)/(1<<20), pass)
	}
	fmt.Fprintf(&md, "\nFloor relay: %.0f impressions/s (%.0f POSTs/s of %d impressions, %d workers, %v window, %d failures).\n\n",
		fr.ImpressionsPerSec, fr.PostsPerSec, fr.Batch, fr.Workers, *floorDur, fr.Failures)
	for _, n := range out.Notes {
		fmt.Fprintf(&md, "- %s\n", n)
	}
	line := fmt.Sprintf("throughput: impressions_per_s=%.0f floor_impressions_per_s=%.0f ratio=%.3f", out.Best, fr.ImpressionsPerSec, out.Ratio)
	fmt.Fprintf(&md, "\n```text\n%s\n```\n", line)
	if err := os.WriteFile(filepath.Join(dir, *name+".md"), md.Bytes(), 0o644); err != nil {
		return err
	}
	if err := writeJSON(filepath.Join(dir, *name+".json"), out); err != nil {
		return err
	}
	_, _ = os.Stdout.Write(md.Bytes())
	fmt.Println(line)
	return nil
}

// throughputStep runs one rate against a fresh Bulkhead.
func throughputStep(ctx context.Context, log *slog.Logger, c *common, bin string, p99Max, profile time.Duration) (*step, error) {
	rec := report.NewRecorder(0)
	st := &step{Offered: c.cfg.Rate}
	if profile > 0 {
		st.Profile = filepath.Join(c.workdir, "cpu.pprof")
	}
	// The profile is taken by a goroutine started with the run; runSystem
	// owns the child, so the profile is fetched through a hook.
	profileHook = func(metricsAddr string, start time.Time) {
		if profile <= 0 {
			return
		}
		go func() {
			at := start.Add(c.cfg.Warmup + c.cfg.Steady/2 - profile/2)
			time.Sleep(time.Until(at))
			if err := fetchProfile(ctx, metricsAddr, profile, st.Profile); err != nil {
				log.Warn("profile", "err", err)
			}
		}()
	}
	defer func() { profileHook = nil }()
	r, err := runSystem(ctx, log, c, bin, sysBaseline, rec, nil)
	if err != nil {
		return nil, err
	}
	o := r.Outcome
	h := rec.Histogram(sysBaseline, scenario.PhaseSteady, report.Healthy)
	st.Latency = h.Latency()
	st.Delivered = float64(h.Count()) / c.cfg.Steady.Seconds()
	st.SubmitLagP99 = o.SubmitLag.P99Ms
	st.Refused, st.Lost = o.Refused, o.Result.Lost
	st.Undelivered = o.Result.Accepted - o.Result.Delivered
	st.CPUSeconds, st.PeakRSS = o.Result.CPUSeconds, o.Result.PeakRSSBytes
	if o.Fleet.OK > 0 {
		st.PerPOST = float64(o.Fleet.Impressions) / float64(o.Fleet.OK)
	}
	switch {
	case st.Latency.P99Ms > float64(p99Max)/1e6:
		st.Why = fmt.Sprintf("p99 %.0f ms", st.Latency.P99Ms)
	case st.Refused > 0:
		st.Why = fmt.Sprintf("%d refused", st.Refused)
	case st.Lost > 0 || st.Undelivered > 0:
		st.Why = fmt.Sprintf("%d lost, %d undelivered", st.Lost, st.Undelivered)
	case st.Delivered < 0.97*st.Offered:
		st.Why = fmt.Sprintf("delivered only %.0f/s", st.Delivered)
	default:
		st.Pass = true
	}
	return st, nil
}

// profileHook, when set, is called by runSystem once a Bulkhead process is
// up, with its metrics address and the run's approximate start.
var profileHook func(metricsAddr string, start time.Time)

// fetchProfile saves a CPU profile of d from the process at metricsAddr.
func fetchProfile(ctx context.Context, metricsAddr string, d time.Duration, path string) error {
	ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", metricsAddr, int(d.Seconds()))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("fetch profile: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("fetch profile: %s", resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
