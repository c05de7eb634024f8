package report

import (
	"fmt"
	"image/color"
	"maps"
	"math"
	"slices"
	"strconv"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// WriteChart draws the healthy destinations' p99 latency per second, one
// line per system (from timelines, keyed by system, e.g.
// Recorder.Timelines(Healthy)), on a logarithmic y axis, with the outage
// window [outageStart, outageEnd) shaded, and saves it to path. The format
// follows path's extension (.png, .svg, .pdf). Seconds without samples
// break a line rather than being drawn as 0. An outage window with
// outageEnd <= outageStart is not drawn.
func WriteChart(path string, timelines map[string][]Point, outageStart, outageEnd time.Duration) error {
	p := plot.New()
	p.Title.Text = "Healthy destinations: p99 end-to-end latency per second"
	p.X.Label.Text = "seconds since start"
	p.Y.Label.Text = "p99 latency (ms, log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	p.X.Tick.Marker = secondTicks{}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Add(plotter.NewGrid())

	// Runs of consecutive seconds with samples, per system, and the data
	// range the axes must cover (a log axis needs positive bounds).
	lo, hi, xmax := math.Inf(1), math.Inf(-1), 0.0
	runs := make(map[string][]plotter.XYs)
	for name, pts := range timelines {
		var cur plotter.XYs
		for _, pt := range pts {
			if pt.Count == 0 || pt.P99Ms <= 0 {
				if len(cur) > 0 {
					runs[name] = append(runs[name], cur)
					cur = nil
				}
				continue
			}
			x := float64(pt.Second)
			cur = append(cur, plotter.XY{X: x, Y: pt.P99Ms})
			lo, hi, xmax = min(lo, pt.P99Ms), max(hi, pt.P99Ms), max(xmax, x)
		}
		if len(cur) > 0 {
			runs[name] = append(runs[name], cur)
		}
	}
	if math.IsInf(lo, 1) {
		lo, hi = 1, 10
	}
	lo, hi = lo/2, hi*2
	p.Y.Min, p.Y.Max = lo, hi
	p.X.Min, p.X.Max = 0, max(xmax, outageEnd.Seconds(), 1)

	if outageEnd > outageStart {
		x0, x1 := outageStart.Seconds(), outageEnd.Seconds()
		shade, err := plotter.NewPolygon(plotter.XYs{{X: x0, Y: lo}, {X: x1, Y: lo}, {X: x1, Y: hi}, {X: x0, Y: hi}})
		if err != nil {
			return fmt.Errorf("write chart %s: outage polygon: %w", path, err)
		}
		shade.Color = color.NRGBA{R: 230, G: 80, B: 60, A: 48}
		shade.LineStyle.Width = 0
		p.Add(shade)
		p.Legend.Add("outage", shade)
	}

	// Sorted so colours and legend order are the same from run to run.
	for i, name := range slices.Sorted(maps.Keys(timelines)) {
		for j, xys := range runs[name] {
			l, err := plotter.NewLine(xys)
			if err != nil {
				return fmt.Errorf("write chart %s: line %s: %w", path, name, err)
			}
			l.Color = plotutil.Color(i)
			l.Width = vg.Points(1.5)
			p.Add(l)
			if j == 0 {
				p.Legend.Add(name, l)
			}
		}
	}
	if err := p.Save(24*vg.Centimeter, 12*vg.Centimeter, path); err != nil {
		return fmt.Errorf("write chart %s: %w", path, err)
	}
	return nil
}

// secondTicks are plot.DefaultTicks labelled as whole seconds.
type secondTicks struct{}

// Ticks returns the default ticks for [min, max] with integer labels.
func (secondTicks) Ticks(min, max float64) []plot.Tick {
	ticks := plot.DefaultTicks{}.Ticks(min, max)
	for i := range ticks {
		if ticks[i].Label != "" {
			ticks[i].Label = strconv.FormatFloat(ticks[i].Value, 'f', -1, 64)
		}
	}
	return ticks
}

// WriteBars draws one bar per label with its value, on a linear y axis up
// to clip (taller bars are cut there; every label carries its value), with
// a dashed line at goal (0: none), and saves it to path; for the
// noisy-neighbor matrix's quiet p99 ÷ baseline per shape.
func WriteBars(path, title, yLabel string, labels []string, values []float64, goal, clip float64) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = yLabel
	p.Add(plotter.NewGrid())
	vals := make(plotter.Values, len(values))
	named := make([]string, len(labels))
	for i, v := range values {
		vals[i] = min(v, clip)
		named[i] = fmt.Sprintf("%s %.2f", labels[i], v)
	}
	bars, err := plotter.NewBarChart(vals, vg.Points(18))
	if err != nil {
		return fmt.Errorf("write chart %s: %w", path, err)
	}
	bars.Color = plotutil.Color(0)
	bars.LineStyle.Width = 0
	p.Add(bars)
	p.NominalX(named...)
	p.X.Tick.Label.Rotation = math.Pi / 5
	p.X.Tick.Label.XAlign, p.X.Tick.Label.YAlign = -0.9, -0.6
	p.Y.Min, p.Y.Max = 0, clip
	if goal > 0 {
		l, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: goal}, {X: float64(len(values)) - 0.5, Y: goal}})
		if err != nil {
			return fmt.Errorf("write chart %s: %w", path, err)
		}
		l.Color = color.NRGBA{R: 220, G: 50, B: 40, A: 255}
		l.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		p.Add(l)
		p.Legend.Add(fmt.Sprintf("goal %.2f", goal), l)
		p.Legend.Top = true
	}
	if err := p.Save(24*vg.Centimeter, 14*vg.Centimeter, path); err != nil {
		return fmt.Errorf("write chart %s: %w", path, err)
	}
	return nil
}
