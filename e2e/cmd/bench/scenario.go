package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
	"github.com/bulkhead-io/bulkhead/e2e/internal/repo"
	"github.com/bulkhead-io/bulkhead/e2e/internal/report"
	"github.com/bulkhead-io/bulkhead/e2e/internal/scenario"
	"github.com/bulkhead-io/bulkhead/e2e/internal/sharedqueue"
)

// The systems a scenario run can compare.
const (
	sysBaseline     = "baseline"
	sysBulkhead     = "bulkhead"
	sysSharedQueue  = "shared-queue"
	sysNoQuarantine = "bulkhead-no-quarantine"
)

// common are the flags every subcommand shares.
type common struct {
	cfg     scenario.Config
	mix     string
	env     stringList
	workdir string
	keep    bool
}

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, " ") }
func (l *stringList) Set(s string) error { *l = append(*l, s); return nil }

func (c *common) register(fs *flag.FlagSet, def scenario.Config) {
	c.cfg = def
	cfg := &c.cfg
	fs.IntVar(&cfg.Destinations, "destinations", def.Destinations, "destinations (one tenant each)")
	fs.Float64Var(&cfg.FailingShare, "failing", def.FailingShare, "share of destinations that fail in the outage")
	fs.StringVar(&c.mix, "fail-mix", "hang,refused,503", "behaviours of failing destinations, assigned in turn (hang, refused, 503, slow-ok, flapping, throttled)")
	fs.Float64Var(&cfg.Rate, "rate", def.Rate, "offered impressions per second, all tenants")
	fs.DurationVar(&cfg.Interval, "interval", def.Interval, "each tenant submits a batch this often")
	fs.DurationVar(&cfg.Warmup, "warmup", def.Warmup, "warm-up phase")
	fs.DurationVar(&cfg.Steady, "steady", def.Steady, "steady phase")
	fs.DurationVar(&cfg.Outage, "outage", def.Outage, "outage phase")
	fs.DurationVar(&cfg.Recovery, "recovery", def.Recovery, "recovery phase (load continues, failing destinations healed)")
	fs.DurationVar(&cfg.DrainMax, "drain-max", def.DrainMax, "longest wait after the load for every accepted impression")
	fs.Uint64Var(&cfg.Seed, "seed", def.Seed, "picks the failing destinations")
	fs.DurationVar(&cfg.Linger, "linger", def.Linger, "destination batch linger (both systems)")
	fs.DurationVar(&cfg.Timeout, "timeout", def.Timeout, "destination request timeout (both systems)")
	fs.IntVar(&cfg.MaxBatch, "max-batch", def.MaxBatch, "impressions per POST at most (both systems)")
	fs.IntVar(&cfg.Senders, "senders", def.Senders, "concurrent submitting goroutines")
	fs.DurationVar(&cfg.SlowDelay, "slow-delay", def.SlowDelay, "delay of slow-ok destinations")
	fs.DurationVar(&cfg.FlapPeriod, "flap-period", def.FlapPeriod, "half-period of flapping destinations")
	fs.Var(&c.env, "env", "extra KEY=VALUE for the Bulkhead process (repeatable), e.g. BULKHEAD_DELIVERER_WORKERS=128")
	fs.StringVar(&c.workdir, "workdir", "", "where Bulkhead's data and logs go (default: a new temporary directory)")
	fs.BoolVar(&c.keep, "keep", false, "keep the work directory")
}

// prepare completes and checks the configuration (after the flags are parsed
// and any subcommand overrides set), then makes the work directory and builds
// the dev stack binary.
func (c *common) prepare(ctx context.Context, log *slog.Logger) (bin string, cleanup func(), err error) {
	if c.cfg.FailMix, err = scenario.ParseMix(c.mix); err != nil {
		return "", nil, err
	}
	if err := c.cfg.Validate(); err != nil {
		return "", nil, err
	}
	root, err := repo.Root()
	if err != nil {
		return "", nil, err
	}
	if c.workdir == "" {
		if c.workdir, err = os.MkdirTemp("", "bulkhead-bench-"); err != nil {
			return "", nil, err
		}
	}
	cleanup = func() {
		if !c.keep {
			_ = os.RemoveAll(c.workdir)
		}
	}
	log.Info("building the dev stack", "workdir", c.workdir)
	if bin, err = buildDevstack(ctx, root, c.workdir); err != nil {
		cleanup()
		return "", nil, err
	}
	return bin, cleanup, nil
}

// systemRun is one system's run in a benchmark.
type systemRun struct {
	Name    string            `json:"name"`
	Outcome *scenario.Outcome `json:"outcome"`
	// SharedQueue are the model's counters at the end (shared-queue only).
	SharedQueue *sharedqueue.Stats `json:"shared_queue,omitempty"`
}

// runSystem runs the scenario against one system: a fresh Bulkhead process
// (with extra environment) or the in-process shared-queue model.
func runSystem(ctx context.Context, log *slog.Logger, c *common, bin, name string, rec *report.Recorder, live func(scenario.Live)) (*systemRun, error) {
	opts := scenario.Options{System: name, Recorder: rec, Live: live, Log: log, Outage: name != sysBaseline}
	out := &systemRun{Name: name}
	if name == sysSharedQueue {
		sq := &scenario.SharedQueue{}
		opts.Target = sq
		o, err := scenario.Run(ctx, c.cfg, opts)
		if sq.Q != nil {
			st := sq.Q.Stats()
			out.SharedQueue = &st
		}
		_ = sq.Close()
		if err != nil {
			return nil, err
		}
		out.Outcome = o
		return out, nil
	}
	extra := append([]string(nil), c.env...)
	if name == sysNoQuarantine {
		extra = append(extra, "BULKHEAD_MONITOR_NO_QUARANTINE=true")
	}
	ch, err := startChild(ctx, bin, filepath.Join(c.workdir, name), c.cfg.Destinations, extra)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err := ch.Stop(); err != nil {
			log.Warn("stop bulkhead", "system", name, "err", err)
		}
	}()
	bh, err := scenario.NewBulkhead(ch.IngestAddr, ch.AdminAddr, adminToken, 2)
	if err != nil {
		return nil, err
	}
	defer bh.Close()
	bh.MetricsURLs = []string{"http://" + ch.RouterMetrics + "/metrics", "http://" + ch.DelivererMetrics + "/metrics"}
	rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	err = bh.Ready(rctx)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("%w (log: %s)", err, ch.LogPath)
	}
	log.Info("bulkhead up", "system", name, "ingest", ch.IngestAddr, "admin", ch.AdminAddr, "pprof", "http://"+ch.MetricsAddr+"/debug/pprof/")
	opts.Target = bh
	if profileHook != nil {
		// Run starts its clock about a second after setup.
		profileHook(ch.MetricsAddr, time.Now().Add(time.Second))
	}
	o, err := scenario.Run(ctx, c.cfg, opts)
	if err != nil {
		return nil, fmt.Errorf("%s: %w (log: %s)", name, err, ch.LogPath)
	}
	if cpu, rss, uerr := ch.usage(); uerr == nil {
		o.Result.CPUSeconds, o.Result.PeakRSSBytes = cpu, rss
	}
	out.Outcome = o
	return out, nil
}

// benchJSON is the JSON file: the report plus per-system details and the
// summary figures.
type benchJSON struct {
	report.Result
	Details []*systemRun       `json:"details"`
	Summary map[string]float64 `json:"summary"`
}

func runScenario(ctx context.Context, log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("scenario", flag.ContinueOnError)
	var c common
	c.register(fs, scenario.Default())
	systems := fs.String("systems", strings.Join([]string{sysBaseline, sysBulkhead, sysSharedQueue}, ","),
		"systems to run, in order: "+strings.Join([]string{sysBaseline, sysBulkhead, sysSharedQueue, sysNoQuarantine}, ", "))
	outDir := fs.String("out", "docs/bench", "directory for the report files (relative to the repository root)")
	name := fs.String("name", "scenario", "base name of the report files (<name>.md, .json, .png)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	bin, cleanup, err := c.prepare(ctx, log)
	if err != nil {
		return err
	}
	defer cleanup()

	rec := report.NewRecorder(0)
	var runs []*systemRun
	for i, s := range strings.Split(*systems, ",") {
		if i > 0 {
			// Let the previous system's process exit and the machine settle.
			time.Sleep(3 * time.Second)
		}
		log.Info("system start", "system", s)
		r, err := runSystem(ctx, log, &c, bin, s, rec, nil)
		if err != nil {
			return err
		}
		runs = append(runs, r)
	}
	return writeScenario(log, &c, *outDir, *name, rec, runs)
}

// writeScenario assembles the report, writes it to outDir/<name>.{md,json,png}
// and stdout, and prints the isolation summary line last.
func writeScenario(log *slog.Logger, c *common, outDir, name string, rec *report.Recorder, runs []*systemRun) error {
	cfg := c.cfg
	root, err := repo.Root()
	if err != nil {
		return err
	}
	if !filepath.IsAbs(outDir) {
		outDir = filepath.Join(root, outDir)
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	failingN := 0
	for _, b := range cfg.Failing() {
		if b != fleet.Healthy {
			failingN++
		}
	}
	res := report.Result{
		Title:               fmt.Sprintf("Noisy-neighbor benchmark: %d destinations, %d failing", cfg.Destinations, failingN),
		Started:             time.Now().UTC(),
		Destinations:        cfg.Destinations,
		FailingDestinations: failingN,
		BaselineSystem:      sysBaseline,
		Phases: []report.Phase{
			{Name: scenario.PhaseWarmup, StartSec: 0, EndSec: cfg.Warmup.Seconds()},
			{Name: scenario.PhaseSteady, StartSec: cfg.Warmup.Seconds(), EndSec: cfg.OnsetAt().Seconds()},
			{Name: scenario.PhaseOutage, StartSec: cfg.OnsetAt().Seconds(), EndSec: cfg.HealAt().Seconds()},
			{Name: scenario.PhaseRecovery, StartSec: cfg.HealAt().Seconds(), EndSec: cfg.Load().Seconds()},
		},
		Params: map[string]string{
			"rate (offered)":     fmt.Sprintf("%.0f impressions/s", cfg.Rate),
			"tenants":            fmt.Sprintf("%d (one per destination)", cfg.Destinations),
			"submit interval":    fmt.Sprintf("%v per tenant (%d impressions per tenant batch at most)", cfg.Interval, (int(math.Round(cfg.Rate*cfg.Interval.Seconds()))+cfg.Destinations-1)/cfg.Destinations),
			"fail mix":           c.mix,
			"seed":               strconv.FormatUint(cfg.Seed, 10),
			"linger / timeout":   fmt.Sprintf("%v / %v (both systems)", cfg.Linger, cfg.Timeout),
			"max batch":          strconv.Itoa(cfg.MaxBatch),
			"machine":            fmt.Sprintf("%d CPUs, %s/%s, %s", runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, runtime.Version()),
			"shared-queue":       fmt.Sprintf("%d workers, backoff %v..%v, %d attempts", sharedqueue.DefaultWorkers, sharedqueue.DefaultFirstBackoff, sharedqueue.DefaultMaxBackoff, sharedqueue.DefaultMaxAttempts),
			"latency measured":   "from the batch's scheduled submit time (open loop) to the destination's 2xx; samples grouped by submit phase/second",
			"bulkhead process":   "the dev stack binary (embedded NATS + 4 services in one process), monitor at default policy",
			"extra bulkhead env": strings.Join(c.env, " "),
			"load generator, fleet and shared-queue model": "this process (same 2 cores)",
		},
		Notes: []string{sharedqueue.Model},
	}
	var details []string
	var elapsed float64
	for _, r := range runs {
		o := r.Outcome
		s := o.Result
		s.Overall, s.Phases = rec.Latencies(r.Name, "")
		res.Systems = append(res.Systems, s)
		elapsed = max(elapsed, o.Elapsed.Seconds())
		d := fmt.Sprintf("%s: scheduled %d, refused %d, generator send lag p99 %.0f ms max %.0f ms, Submit call p50 %.1f ms p99 %.0f ms, drain wait %.1f s, duplicate deliveries %d, unknown keys %d, destinations' requests %d (ok %d, 503 %d, 429 %d, dropped %d)",
			r.Name, o.Scheduled, o.Refused, o.SubmitLag.P99Ms, o.SubmitLag.MaxMs, o.SubmitCall.P50Ms, o.SubmitCall.P99Ms, o.DrainWait.Seconds(), s.Duplicates, o.BadKeys,
			o.Fleet.Requests, o.Fleet.OK, o.Fleet.Status503, o.Fleet.Status429, o.Fleet.Dropped)
		if s.Failing != nil {
			d += fmt.Sprintf("; failing quarantined %d/%d, healthy quarantined %d, backlog drained %d/%d",
				len(o.Quarantined), s.Failing.Destinations, o.HealthyQuarantined, len(o.Drained), s.Failing.Destinations)
			if o.ParkedByCounter {
				d += fmt.Sprintf(", parked impressions by Bulkhead's counters (router park + deliverer parked): failing %d, healthy %d",
					s.Failing.Parked, o.ParkedHealthy)
			}
		}
		if sq := r.SharedQueue; sq != nil {
			d += fmt.Sprintf("; model: exhausted (dropped) %d, still held %d, max FIFO depth %d tasks, attempts %d, timeouts %d",
				sq.Exhausted, sq.Held, sq.MaxQueueDepth, sq.Attempts, sq.Timeouts)
		}
		details = append(details, d)
	}
	res.DurationSec = elapsed
	report.RatiosTo(res.Systems, sysBaseline)
	res.Notes = append([]string{"Per-system details:\n- " + strings.Join(details, "\n- ")}, res.Notes...)

	sum, line := summary(res, runs)
	var md bytes.Buffer
	if err := report.WriteMarkdown(&md, res); err != nil {
		return err
	}
	md.WriteString("Summary line:\n\n```text\n" + line + "\n```\n")
	if err := os.WriteFile(filepath.Join(outDir, name+".md"), md.Bytes(), 0o644); err != nil {
		return err
	}
	if err := writeJSON(filepath.Join(outDir, name+".json"), benchJSON{Result: res, Details: runs, Summary: sum}); err != nil {
		return err
	}
	if err := report.WriteChart(filepath.Join(outDir, name+".png"), rec.Timelines(report.Healthy), cfg.OnsetAt(), cfg.HealAt()); err != nil {
		return err
	}
	log.Info("report written", "dir", outDir, "name", name)
	_, _ = os.Stdout.Write(md.Bytes())
	fmt.Println(line)
	return nil
}

// summary computes the headline figures and the last line.
func summary(res report.Result, runs []*systemRun) (map[string]float64, string) {
	outageP99Ratio := func(system string) float64 {
		for _, s := range res.Systems {
			if s.Name != system {
				continue
			}
			for _, pl := range s.Phases {
				if pl.Phase == scenario.PhaseOutage && pl.Class == report.Healthy {
					return pl.P99Ratio
				}
			}
		}
		return math.NaN()
	}
	sum := map[string]float64{
		"healthy_p99_ratio":      outageP99Ratio(sysBulkhead),
		"shared_queue_p99_ratio": outageP99Ratio(sysSharedQueue),
		"quarantine_p50_s":       math.NaN(),
		"drain_s":                math.NaN(),
	}
	var lost int64
	drain := "n/a"
	for _, s := range res.Systems {
		if s.Name != sysSharedQueue {
			lost += s.Lost
		}
		if s.Name == sysBulkhead && s.Failing != nil {
			f := s.Failing
			if f.OnsetToQuarantine.Count > 0 {
				sum["quarantine_p50_s"] = f.OnsetToQuarantine.P50Ms / 1000
			}
			if f.HealToDrained.Count == f.Destinations && f.Destinations > 0 {
				sum["drain_s"] = f.HealToDrained.MaxMs / 1000
				drain = fmt.Sprintf("%.1f", sum["drain_s"])
			} else {
				drain = fmt.Sprintf("incomplete(%d/%d)", f.HealToDrained.Count, f.Destinations)
			}
		}
	}
	sum["lost"] = float64(lost)
	for _, r := range runs {
		if r.Name == sysSharedQueue && r.SharedQueue != nil {
			sum["shared_queue_dropped"] = float64(r.SharedQueue.Exhausted)
		}
	}
	line := fmt.Sprintf("isolation: healthy_p99_ratio=%s shared_queue_p99_ratio=%s lost=%d quarantine_p50_s=%s drain_s=%s",
		fmtF(sum["healthy_p99_ratio"], 2), fmtF(sum["shared_queue_p99_ratio"], 1), lost, fmtF(sum["quarantine_p50_s"], 1), drain)
	for k, v := range sum {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			delete(sum, k) // JSON has no NaN
		}
	}
	return sum, line
}

func fmtF(v float64, prec int) string {
	if math.IsNaN(v) {
		return "n/a"
	}
	return strconv.FormatFloat(v, 'f', prec, 64)
}

// writeJSON writes v to path as indented JSON.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
