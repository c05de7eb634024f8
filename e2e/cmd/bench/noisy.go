package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/noisy"
	"github.com/bulkhead-io/bulkhead/e2e/internal/repo"
	"github.com/bulkhead-io/bulkhead/e2e/internal/report"
	"github.com/bulkhead-io/bulkhead/e2e/internal/scenario"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
)

// noisyJSON is what bench noisy writes to docs/bench/noisy.json.
type noisyJSON struct {
	Date     string         `json:"date"`
	Machine  string         `json:"machine"`
	Measure  string         `json:"measure"`
	Env      []string       `json:"env"`
	Rows     []noisy.Result `json:"rows"`
	Baseline int64          `json:"baseline_quiet_p99_ns"`
}

// runNoisy runs the noisy-neighbor matrix: a baseline row (quiet tenants
// only) and one row per shape of noisy tenant, each against a fresh Bulkhead
// process, and prints one line per row.
func runNoisy(ctx context.Context, log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("noisy", flag.ContinueOnError)
	measure := fs.Duration("measure", 30*time.Second, "load per row")
	drain := fs.Duration("drain", 90*time.Second, "longest wait after the load of a row")
	only := fs.String("shapes", "", "comma-separated shapes to run (default: all); baseline always runs")
	budget := fs.Int("tenant-parked-budget", 200, "the monitor's -tenant-parked-budget in batches, small so the paused row fills it within the load")
	rate := fs.Float64("tenant-rate", 25000, "ingest's -tenant-rate: what the flood row offers")
	out := fs.String("out", "", "directory for noisy.md and noisy.json (default: docs/bench)")
	workdir := fs.String("workdir", "", "where Bulkhead's data and logs go (default: a new temporary directory)")
	from := fs.String("from", "", "write noisy.md, noisy.png from this noisy.json instead of running")
	profile := fs.String("profile", "", "directory for a 20 s CPU profile of Bulkhead taken during each row's load (<shape>.pprof)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	root, err := repo.Root()
	if err != nil {
		return err
	}
	if *out == "" {
		*out = filepath.Join(root, "docs", "bench")
	}
	if *from != "" {
		return rewriteNoisy(*from, *out)
	}
	if *workdir == "" {
		if *workdir, err = os.MkdirTemp("", "bulkhead-noisy-"); err != nil {
			return err
		}
		defer func() { _ = os.RemoveAll(*workdir) }()
	}
	bin, err := buildDevstack(ctx, root, *workdir)
	if err != nil {
		return err
	}
	env := []string{
		fmt.Sprintf("BULKHEAD_MONITOR_TENANT_PARKED_BUDGET=%d", *budget),
		fmt.Sprintf("BULKHEAD_INGEST_TENANT_RATE=%.0f", *rate),
		fmt.Sprintf("BULKHEAD_INGEST_TENANT_BURST=%.0f", 2**rate),
	}
	const tenants = 4 // three quiet, one noisy
	var keys, ids []string
	for i := range tenants {
		keys, ids = append(keys, scenario.APIKey(i)), append(ids, scenario.TenantID(i))
	}
	want := map[string]bool{}
	for _, s := range strings.Split(*only, ",") {
		if s != "" {
			want[s] = true
		}
	}
	var rows []noisy.Result
	var lines []string
	var baseline time.Duration
	for i, s := range noisy.Shapes(*rate) {
		if len(want) > 0 && !s.Idle && !want[s.Name] {
			continue
		}
		log.Info("row start", "shape", s.Name)
		c, err := startChild(ctx, bin, filepath.Join(*workdir, fmt.Sprintf("row-%02d", i)), tenants, env)
		if err != nil {
			return err
		}
		wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		for _, addr := range []string{c.IngestAddr, c.AdminAddr} {
			if err == nil {
				err = grpcserver.WaitServing(wctx, addr)
			}
		}
		cancel()
		if err != nil {
			_ = c.Stop()
			return fmt.Errorf("row %s: %w (log %s)", s.Name, err, c.LogPath)
		}
		if *profile != "" {
			go cpuProfile(ctx, log, "http://"+c.MetricsAddr, filepath.Join(*profile, s.Name+".pprof"))
		}
		res, err := noisy.Run(ctx, noisy.Options{
			IngestAddr: c.IngestAddr, AdminAddr: c.AdminAddr, AdminToken: adminToken,
			Keys: keys, Tenants: ids, Quiet: tenants - 1, QuietBatch: 10, QuietEvery: 100 * time.Millisecond,
			Measure: *measure, Drain: *drain, Timeout: 10 * time.Second, SlowDelay: 9500 * time.Millisecond, Log: log,
		}, s)
		if serr := c.Stop(); serr != nil {
			log.Warn("stop bulkhead", "err", serr)
		}
		if err != nil {
			return fmt.Errorf("row %s: %w (log %s)", s.Name, err, c.LogPath)
		}
		if s.Idle {
			baseline = res.QuietP99
		}
		line := res.Line(baseline)
		fmt.Println(line)
		rows, lines = append(rows, res), append(lines, line)
	}
	return writeNoisy(*out, *measure, env, baseline, rows, lines)
}

// rewriteNoisy renders noisy.md and noisy.png again from a noisy.json.
func rewriteNoisy(from, dir string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	var j noisyJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return fmt.Errorf("%s: %w", from, err)
	}
	var lines []string
	for _, r := range j.Rows {
		lines = append(lines, r.Line(time.Duration(j.Baseline)))
	}
	return render(dir, j, lines)
}

func writeNoisy(dir string, measure time.Duration, env []string, baseline time.Duration, rows []noisy.Result, lines []string) error {
	j := noisyJSON{Date: time.Now().UTC().Format(time.RFC3339), Machine: fmt.Sprintf("%d cores, %s", runtime.NumCPU(), runtime.Version()),
		Measure: measure.String(), Env: env, Rows: rows, Baseline: int64(baseline)}
	return render(dir, j, lines)
}

// render writes noisy.json, noisy.md and noisy.png for j.
func render(dir string, j noisyJSON, lines []string) error {
	rows, baseline, measure, env := j.Rows, time.Duration(j.Baseline), j.Measure, j.Env
	var labels []string
	var ratios []float64
	for _, r := range rows {
		labels = append(labels, r.Shape)
		ratios = append(ratios, float64(r.QuietP99)/float64(max(baseline, 1)))
	}
	if err := report.WriteBars(filepath.Join(dir, "noisy.png"), "Quiet tenants' p99 beside one noisy tenant, per shape",
		"quiet p99 ÷ baseline (bars cut at 3)", labels, ratios, 1.25, 3); err != nil {
		return err
	}
	b, err := json.MarshalIndent(j, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "noisy.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	var md strings.Builder
	fmt.Fprintf(&md, "# Noisy-neighbor matrix\n\n`make bench-noisy`, %s, %s. Each row runs against a fresh Bulkhead process (the dev stack), "+
		"with three quiet tenants (one healthy destination each, 10 impressions every 100 ms) and one noisy tenant in the row's shape, "+
		"for %s of load; then the noisy endpoints heal, a paused destination is resumed, and everything is accounted by impression key. "+
		"Settings: %s.\n\n", j.Date, j.Machine, measure, strings.Join(env, " "))
	md.WriteString("Quiet p99 is end to end, from each quiet impression's Submit to its arrival. Lost counts copies (an impression times a destination) " +
		"neither delivered nor parked when the drain ended; duplicates, copies beyond one per destination. " +
		"The noisy tenant's refusals are by ErrorInfo reason.\n\n")
	md.WriteString("| shape | quiet p99 | × baseline | lost | duplicates | quiet refused | noisy accepted | noisy delivered | noisy parked | noisy refused |\n")
	md.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, r := range rows {
		ratio := float64(r.QuietP99) / float64(max(baseline, 1))
		var ref []string
		for _, k := range slices.Sorted(maps.Keys(r.NoisyRefused)) {
			ref = append(ref, fmt.Sprintf("%s %d", k, r.NoisyRefused[k]))
		}
		fmt.Fprintf(&md, "| %s | %.0f ms | %.2f | %d | %d | %d | %d | %d | %d | %s |\n", r.Shape, float64(r.QuietP99)/1e6, ratio,
			r.QuietLost+r.NoisyLost, r.QuietDups+r.NoisyDups, r.QuietRefused, r.NoisyAccepted, r.NoisyDelivered, r.NoisyParked, strings.Join(ref, ", "))
	}
	md.WriteString("\nThe lines `make bench-noisy` printed:\n\n```text\n" + strings.Join(lines, "\n") + "\n```\n")
	return os.WriteFile(filepath.Join(dir, "noisy.md"), []byte(md.String()), 0o644)
}

// cpuProfile saves a 20 s CPU profile of the Bulkhead process, starting 5 s
// into the row (setup done, load running).
func cpuProfile(ctx context.Context, log *slog.Logger, base, path string) {
	select {
	case <-ctx.Done():
		return
	case <-time.After(5 * time.Second):
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/debug/pprof/profile?seconds=20", nil)
	if err != nil {
		return
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		log.Warn("profile", "err", err)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		log.Warn("profile", "err", err)
		return
	}
	defer f.Close()
	if _, err := io.Copy(f, resp.Body); err != nil {
		log.Warn("profile", "err", err)
	}
}
