package stall

import (
	"slices"
	"testing"
	"time"
)

var t0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func at(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }

func TestBacklogThatDoesNotMoveStalls(t *testing.T) {
	tr, err := New(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for s := 0; s < 30; s += 5 {
		if st, _ := tr.Update(at(s), map[string]int64{"d": 10}, nil); len(st) != 0 {
			t.Fatalf("t=%ds: stalled %v before 30 s without progress", s, st)
		}
	}
	st, _ := tr.Update(at(30), map[string]int64{"d": 10}, nil)
	if !slices.Equal(st, []string{"d"}) || !tr.Since("d").Equal(at(30)) || tr.Stalled() != 1 {
		t.Fatalf("t=30s: stalled %v since %v (%d): want [d] since +30s", st, tr.Since("d"), tr.Stalled())
	}
	// Reported once, not on every update.
	if st, _ := tr.Update(at(35), map[string]int64{"d": 11}, nil); len(st) != 0 {
		t.Fatalf("stalled reported again: %v", st)
	}
}

func TestProgressKeepsABacklogFromStalling(t *testing.T) {
	cases := []struct {
		name string
		step func(tr *Tracker, s int) map[string]int64
	}{
		{"attempts", func(tr *Tracker, s int) map[string]int64 {
			tr.Attempt("d", at(s))
			return map[string]int64{"d": 10}
		}},
		{"shrinking backlog (parked without attempts)", func(_ *Tracker, s int) map[string]int64 {
			return map[string]int64{"d": int64(1000 - s)}
		}},
		{"backlog emptied now and then", func(_ *Tracker, s int) map[string]int64 {
			if s%20 == 0 {
				return nil
			}
			return map[string]int64{"d": 3}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tr, _ := New(30 * time.Second)
			for s := 0; s <= 300; s += 5 {
				if st, _ := tr.Update(at(s), c.step(tr, s), nil); len(st) != 0 {
					t.Fatalf("t=%ds: stalled %v", s, st)
				}
			}
		})
	}
}

func TestStalledResumes(t *testing.T) {
	tr, _ := New(10 * time.Second)
	tr.Update(at(0), map[string]int64{"a": 5, "b": 5}, nil)
	if st, _ := tr.Update(at(10), map[string]int64{"a": 5, "b": 5}, nil); !slices.Equal(st, []string{"a", "b"}) {
		t.Fatalf("stalled %v, want [a b]", st)
	}
	tr.Attempt("a", at(11))
	_, res := tr.Update(at(15), map[string]int64{"a": 5}, nil) // b's backlog is gone
	if !slices.Equal(res, []string{"a", "b"}) || tr.Stalled() != 0 {
		t.Fatalf("resumed %v with %d stalled, want [a b] and none", res, tr.Stalled())
	}
	if !tr.Since("a").IsZero() {
		t.Fatalf("a still stalled since %v", tr.Since("a"))
	}
}

func TestPatienceForSlowDestinations(t *testing.T) {
	tr, _ := New(10 * time.Second)
	patience := func(dest string) time.Duration {
		if dest == "slow" {
			return time.Minute
		}
		return 0
	}
	backlog := map[string]int64{"slow": 1, "fast": 1}
	tr.Update(at(0), backlog, patience)
	st, _ := tr.Update(at(30), backlog, patience)
	if !slices.Equal(st, []string{"fast"}) {
		t.Fatalf("t=30s stalled %v, want [fast]", st)
	}
	if st, _ := tr.Update(at(60), backlog, patience); !slices.Equal(st, []string{"slow"}) {
		t.Fatalf("t=60s stalled %v, want [slow]", st)
	}
}

func TestNewRefusesNonPositive(t *testing.T) {
	if _, err := New(0); err == nil {
		t.Fatal("New(0) succeeded")
	}
}
