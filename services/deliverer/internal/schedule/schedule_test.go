package schedule

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/bulkhead-io/bulkhead/pkg/poll"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func newScheduler(t testing.TB, cfg Config) *Scheduler[int] {
	t.Helper()
	s, err := New[int](cfg)
	if err != nil {
		t.Fatalf("New(%+v): %v", cfg, err)
	}
	t.Cleanup(s.Close)
	return s
}

func mustPush(t testing.TB, s *Scheduler[int], lane, tenant string, item, cost int) {
	t.Helper()
	if err := s.Push(lane, tenant, item, cost); err != nil {
		t.Fatalf("Push(%s, %s, %d): %v", lane, tenant, item, err)
	}
}

// mustNext returns the next ticket, failing the test if none is ready.
func mustNext(t testing.TB, s *Scheduler[int]) Ticket[int] {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tk, err := s.Next(ctx)
	if err != nil {
		t.Fatalf("Next: %v", err)
	}
	return tk
}

// assertBlocked checks that Next has nothing to hand out.
func assertBlocked(t *testing.T, s *Scheduler[int]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if tk, err := s.Next(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Next = %+v, %v; want it to block", tk, err)
	}
}

func stats(t *testing.T, s *Scheduler[int], lane string) Stats {
	t.Helper()
	st, ok := s.Stats(lane)
	if !ok {
		t.Fatalf("Stats(%s): no such lane", lane)
	}
	return st
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"zero is defaults", Config{}, true},
		{"default", DefaultConfig(), true},
		{"fixed cap", Config{MinCap: 3, InitialCap: 3, MaxCap: 3}, true},
		{"negative quantum", Config{Quantum: -1}, false},
		{"negative queue", Config{MaxQueued: -1}, false},
		{"negative min cap", Config{MinCap: -1}, false},
		{"max below min", Config{MinCap: 4, InitialCap: 4, MaxCap: 2}, false},
		{"initial above max", Config{InitialCap: 9}, false},
		{"initial below min", Config{MinCap: 3}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if tt.ok != (err == nil) || (err != nil && !errors.Is(err, ErrInvalidConfig)) {
				t.Fatalf("Validate() = %v, want ok=%v", err, tt.ok)
			}
			if _, err := New[int](tt.cfg); tt.ok != (err == nil) {
				t.Fatalf("New() = %v, want ok=%v", err, tt.ok)
			}
		})
	}
}

func TestFIFOWithinLane(t *testing.T) {
	s := newScheduler(t, Config{InitialCap: 8})
	for i := range 20 {
		mustPush(t, s, "a", "t", i, 1+i%7)
	}
	for want := range 20 {
		tk := mustNext(t, s)
		if tk.Item != want || tk.Lane != "a" || tk.Tenant != "t" || tk.Cost != 1+want%7 {
			t.Fatalf("ticket %+v, want item %d of lane a", tk, want)
		}
		s.Done(tk, Neutral)
	}
	assertBlocked(t, s)
}

func TestPushErrors(t *testing.T) {
	s := newScheduler(t, Config{MaxQueued: 3})
	for i := range 3 {
		mustPush(t, s, "a", "t", i, 1)
	}
	if err := s.Push("a", "t", 3, 1); !errors.Is(err, ErrLaneFull) {
		t.Fatalf("Push to a full lane = %v, want ErrLaneFull", err)
	}
	mustPush(t, s, "b", "t", 0, 1) // other lanes are not affected
	if err := s.Push("a", "other", 0, 1); !errors.Is(err, ErrTenantMismatch) {
		t.Fatalf("Push with another tenant = %v, want ErrTenantMismatch", err)
	}
	// In-flight items do not count towards MaxQueued.
	for tk := mustNext(t, s); tk.Lane != "a"; tk = mustNext(t, s) {
	}
	mustPush(t, s, "a", "t", 3, 1)
	if err := s.Push("a", "t", 4, 1); !errors.Is(err, ErrLaneFull) {
		t.Fatalf("Push to a full lane = %v, want ErrLaneFull", err)
	}

	s.Close()
	if err := s.Push("c", "t", 0, 1); !errors.Is(err, ErrClosed) {
		t.Fatalf("Push after Close = %v, want ErrClosed", err)
	}
}

// TestAIMD drives one lane through sequences of results and checks its cap.
func TestAIMD(t *testing.T) {
	ok := func(n int) []Result { return slices.Repeat([]Result{OK}, n) }
	fail := func(n int) []Result { return slices.Repeat([]Result{Failure}, n) }
	tests := []struct {
		name    string
		results []Result
		want    int
	}{
		{"starts at initial", nil, 2},
		{"one success is not enough", ok(1), 2},
		{"cap successes grow by one", ok(2), 3},
		{"then cap+1 more", ok(2 + 3), 4},
		{"grows to max", ok(100), 8},
		{"failure halves", append(ok(2+3+4+5), fail(1)...), 3},
		{"failures shrink to min", fail(5), 1},
		{"failure resets the streak", append(append(ok(2+3+3), fail(1)...), ok(1)...), 2},
		{"neutral changes nothing", []Result{OK, Neutral, Neutral, OK}, 3},
		{"recovers after shrinking", append(fail(3), ok(1+2)...), 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newScheduler(t, Config{MaxQueued: 1000})
			mustPush(t, s, "a", "t", -1, 1) // creates the lane
			for i := range tt.results {
				mustPush(t, s, "a", "t", i, 1)
			}
			for _, r := range tt.results {
				s.Done(mustNext(t, s), r)
			}
			if got := stats(t, s, "a").Cap; got != tt.want {
				t.Fatalf("cap = %d, want %d", got, tt.want)
			}
		})
	}
}

// TestCapBoundsInFlight checks that a lane never has more tickets out than its
// cap, also when the cap shrinks below what is in flight.
func TestCapBoundsInFlight(t *testing.T) {
	s := newScheduler(t, Config{InitialCap: 4})
	for i := range 10 {
		mustPush(t, s, "a", "t", i, 1)
	}
	var out []Ticket[int]
	for range 4 {
		out = append(out, mustNext(t, s))
	}
	assertBlocked(t, s)

	s.Done(out[0], Failure) // cap 4 → 2, 3 still in flight
	if st := stats(t, s, "a"); st.Cap != 2 || st.InFlight != 3 || st.Queued != 6 {
		t.Fatalf("stats %+v, want cap 2, 3 in flight, 6 queued", st)
	}
	assertBlocked(t, s)
	s.Done(out[1], Neutral)
	assertBlocked(t, s)
	s.Done(out[2], Neutral) // 1 in flight, cap 2: one slot
	mustNext(t, s)
	assertBlocked(t, s)
}

// TestBlackHoledLaneHoldsAtMostCapWorkers is the isolation property with real
// workers: lane a's requests never complete, and lane b must still deliver
// everything while a holds no more than its cap of the 8 workers.
func TestBlackHoledLaneHoldsAtMostCapWorkers(t *testing.T) {
	defer goleak.VerifyNone(t)
	const workers, itemsB = 8, 1000
	s, err := New[int](Config{MaxQueued: 2 * itemsB})
	if err != nil {
		t.Fatal(err)
	}

	blackHole := make(chan struct{}) // closed at test end
	var holdingA, maxHoldingA atomic.Int32
	var doneB sync.WaitGroup
	doneB.Add(itemsB)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				tk, err := s.Next(context.Background())
				if err != nil {
					return
				}
				if tk.Lane == "a" {
					n := holdingA.Add(1)
					for {
						m := maxHoldingA.Load()
						if n <= m || maxHoldingA.CompareAndSwap(m, n) {
							break
						}
					}
					<-blackHole
					holdingA.Add(-1)
					s.Done(tk, Failure)
					continue
				}
				s.Done(tk, OK)
				doneB.Done()
			}
		})
	}

	// a is pushed first and gets a share of every round; b must flow anyway.
	for i := range itemsB {
		if i < 50 {
			mustPush(t, s, "a", "ta", i, 100)
		}
		mustPush(t, s, "b", "tb", i, 100)
	}
	finished := make(chan struct{})
	go func() { doneB.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(10 * time.Second):
		t.Errorf("lane b stalled: %+v", stats(t, s, "b"))
	}

	if m := maxHoldingA.Load(); m > 2 {
		t.Errorf("black-holed lane held %d workers, want at most its cap 2", m)
	}
	if st := stats(t, s, "a"); st.InFlight != 2 || st.Queued != 48 {
		t.Errorf("lane a %+v, want 2 in flight, 48 queued", st)
	}
	close(blackHole)
	s.Close()
	wg.Wait()
	<-finished
}

// TestDRRFairnessAcrossLanes: a lane with a deep backlog does not delay a lane
// with a short one; every round each gets a quantum of impressions.
func TestDRRFairnessAcrossLanes(t *testing.T) {
	s := newScheduler(t, Config{Quantum: 500, MaxQueued: 10000})
	for i := range 10000 {
		mustPush(t, s, "big", "t", i, 100)
	}
	for i := range 10 {
		mustPush(t, s, "small", "t", i, 100)
	}
	// A round is 500 impressions per lane: 5 items of each. The small lane
	// is done after two rounds, its 10th item at pick 20 at the latest.
	lastSmall := -1
	for i := range 40 {
		tk := mustNext(t, s)
		s.Done(tk, Neutral)
		if tk.Lane == "small" {
			lastSmall = i
		}
	}
	if st := stats(t, s, "small"); st.Queued != 0 {
		t.Fatalf("small lane still has %d queued after 40 picks", st.Queued)
	}
	if lastSmall >= 20 {
		t.Fatalf("small lane's last item was pick %d, want within the first 2 rounds (20 picks)", lastSmall)
	}
}

// TestDRRWeightsImpressions: lanes share impressions, not batches: a lane of
// 50-impression batches gets ten batches for each 500-impression batch of the
// other.
func TestDRRWeightsImpressions(t *testing.T) {
	s := newScheduler(t, Config{Quantum: 500, MaxQueued: 10000})
	for i := range 1000 {
		mustPush(t, s, "large", "t", i, 500)
		mustPush(t, s, "tiny", "t", i, 50)
	}
	served := map[string]int{}
	for range 550 {
		tk := mustNext(t, s)
		s.Done(tk, Neutral)
		served[tk.Lane] += tk.Cost
	}
	if d := served["large"] - served["tiny"]; d < -500 || d > 500 {
		t.Fatalf("impressions served %v, want equal within a quantum", served)
	}
}

// TestOversizedCostIsCharged: an item costing several quanta makes its lane
// skip rounds until the debt is paid, also when the lane goes idle meanwhile.
func TestOversizedCostIsCharged(t *testing.T) {
	s := newScheduler(t, Config{Quantum: 100, MaxQueued: 1000})
	mustPush(t, s, "huge", "t", 0, 1000) // ten quanta
	mustPush(t, s, "huge", "t", 1, 1000)
	for i := range 100 {
		mustPush(t, s, "small", "t", i, 100)
	}
	var order []string
	for range 30 {
		tk := mustNext(t, s)
		s.Done(tk, Neutral)
		order = append(order, tk.Lane)
	}
	var huge []int
	for i, l := range order {
		if l == "huge" {
			huge = append(huge, i)
		}
	}
	// huge is served first, then waits ten rounds (one small item each).
	if len(huge) != 2 || huge[0] != 0 || huge[1]-huge[0] < 10 {
		t.Fatalf("huge served at picks %v, want 0 and then 10 rounds later", huge)
	}
}

// TestTenantFairness: a tenant with one destination gets as much as a tenant
// with fifty, rather than one fifty-first.
func TestTenantFairness(t *testing.T) {
	s := newScheduler(t, Config{Quantum: 500, MaxQueued: 1000})
	for l := range 50 {
		for i := range 20 {
			mustPush(t, s, fmt.Sprintf("many-%d", l), "many", i, 100)
		}
	}
	for i := range 500 {
		mustPush(t, s, "one-0", "one", i, 100)
	}
	served := map[string]int{}
	lanesOfMany := map[string]bool{}
	for range 400 {
		tk := mustNext(t, s)
		s.Done(tk, Neutral)
		served[tk.Tenant]++
		if tk.Tenant == "many" {
			lanesOfMany[tk.Lane] = true
		}
	}
	if d := served["one"] - served["many"]; d < -10 || d > 10 {
		t.Fatalf("items served per tenant %v, want equal within two rounds", served)
	}
	// Within the tenant, its lanes take turns.
	if len(lanesOfMany) < 35 {
		t.Fatalf("tenant many served %d of its 50 lanes in %d picks, want its lanes to take turns", len(lanesOfMany), served["many"])
	}
}

// TestDrain: Drain returns the queued items in order and leaves the in-flight
// ones, the cap and the lane in place.
func TestDrain(t *testing.T) {
	s := newScheduler(t, Config{})
	for i := range 5 {
		mustPush(t, s, "a", "t", i, 1)
	}
	first, second := mustNext(t, s), mustNext(t, s)
	if got := s.Drain("a"); !slices.Equal(got, []int{2, 3, 4}) {
		t.Fatalf("Drain = %v, want [2 3 4]", got)
	}
	if st := stats(t, s, "a"); st != (Stats{Queued: 0, InFlight: 2, Cap: 2}) {
		t.Fatalf("after Drain: %+v", st)
	}
	assertBlocked(t, s)
	s.Done(first, OK)
	s.Done(second, OK)
	if st := stats(t, s, "a"); st.InFlight != 0 || st.Cap != 3 {
		t.Fatalf("after Done: %+v, want nothing in flight and cap 3", st)
	}
	mustPush(t, s, "a", "t", 5, 1)
	if tk := mustNext(t, s); tk.Item != 5 {
		t.Fatalf("Next after Drain = %d, want 5", tk.Item)
	}
}

func TestRemove(t *testing.T) {
	s := newScheduler(t, Config{})
	for i := range 4 {
		mustPush(t, s, "a", "t", i, 1)
	}
	tk := mustNext(t, s)
	if got := s.Remove("a"); !slices.Equal(got, []int{1, 2, 3}) {
		t.Fatalf("Remove = %v, want [1 2 3]", got)
	}
	if _, ok := s.Stats("a"); ok {
		t.Fatal("removed lane still has stats")
	}
	assertBlocked(t, s)

	// A new lane under the same id, even for another tenant, starts afresh;
	// the old ticket's Done does not touch it.
	mustPush(t, s, "a", "u", 10, 1)
	s.Done(tk, Failure)
	if st := stats(t, s, "a"); st != (Stats{Queued: 1, InFlight: 0, Cap: 2}) {
		t.Fatalf("new lane %+v", st)
	}
	if got := mustNext(t, s); got.Item != 10 || got.Tenant != "u" {
		t.Fatalf("Next = %+v, want item 10 of tenant u", got)
	}
	if got := s.Remove("nope"); got != nil {
		t.Fatalf("Remove of unknown lane = %v", got)
	}
	s.Done(Ticket[int]{}, OK) // the zero ticket is ignored
}

func TestCloseWakesWaiters(t *testing.T) {
	defer goleak.VerifyNone(t)
	s, err := New[int](Config{})
	if err != nil {
		t.Fatal(err)
	}
	const waiters = 4
	errs := make(chan error, waiters)
	for range waiters {
		go func() {
			_, err := s.Next(context.Background())
			errs <- err
		}()
	}
	poll.CheckFor(t, 5*time.Second, time.Millisecond, func() error {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.waiting != waiters {
			return fmt.Errorf("%d of %d Next calls waiting", s.waiting, waiters)
		}
		return nil
	})
	s.Close()
	for range waiters {
		if err := <-errs; !errors.Is(err, ErrClosed) {
			t.Fatalf("Next = %v, want ErrClosed", err)
		}
	}
	if _, err := s.Next(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Next after Close = %v, want ErrClosed", err)
	}
	s.Close() // idempotent
}

func TestNextContext(t *testing.T) {
	s := newScheduler(t, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	mustPush(t, s, "a", "t", 0, 1)
	if _, err := s.Next(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Next with a cancelled context = %v, want context.Canceled", err)
	}
	if st := stats(t, s, "a"); st.Queued != 1 {
		t.Fatalf("cancelled Next took an item: %+v", st)
	}
}

// TestWakeupNotLostToCancelledWaiter: when a waiter that was signalled gives
// up because its context ended, another waiter still gets the item.
func TestWakeupNotLostToCancelledWaiter(t *testing.T) {
	defer goleak.VerifyNone(t)
	s, err := New[int](Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := range 200 {
		ctx, cancel := context.WithCancel(context.Background())
		live, stop := context.WithCancel(context.Background())
		got := make(chan Ticket[int], 2)
		var wg sync.WaitGroup
		for _, c := range []context.Context{ctx, live} {
			wg.Go(func() {
				if tk, err := s.Next(c); err == nil {
					got <- tk
				}
			})
		}
		poll.CheckFor(t, 5*time.Second, 50*time.Microsecond, func() error {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.waiting != 2 {
				return fmt.Errorf("%d waiting", s.waiting)
			}
			return nil
		})
		// Race the cancellation against the push. Either waiter may take the
		// item (the cancelled one if it wins before seeing its context end),
		// but someone must.
		go cancel()
		mustPush(t, s, "a", "t", i, 1)
		select {
		case tk := <-got:
			s.Done(tk, Neutral)
		case <-time.After(5 * time.Second):
			t.Fatalf("iteration %d: item stuck with a waiter blocked", i)
		}
		cancel()
		stop()
		wg.Wait()
	}
}

// TestConcurrentInvariants runs producers and workers on many lanes with
// random outcomes and checks that every item is handed out exactly once and
// that no lane ever exceeds its cap. Run with -race.
func TestConcurrentInvariants(t *testing.T) {
	defer goleak.VerifyNone(t)
	const lanes, perLane, workers = 50, 200, 8
	s, err := New[int](Config{Quantum: 300})
	if err != nil {
		t.Fatal(err)
	}
	var inflight [lanes]atomic.Int32
	seen := make([]atomic.Int32, lanes*perLane)
	var delivered sync.WaitGroup
	delivered.Add(lanes * perLane)

	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			rnd := rand.New(rand.NewPCG(uint64(w), 1))
			for {
				tk, err := s.Next(context.Background())
				if err != nil {
					return
				}
				l := tk.Item / perLane
				if n := inflight[l].Add(1); n > 8 {
					t.Errorf("lane %d: %d in flight, above MaxCap", l, n)
				}
				if seen[tk.Item].Add(1) != 1 {
					t.Errorf("item %d handed out twice", tk.Item)
				}
				inflight[l].Add(-1)
				s.Done(tk, []Result{OK, OK, OK, Failure, Neutral}[rnd.IntN(5)])
				delivered.Done()
			}
		})
	}
	var producers sync.WaitGroup
	for l := range lanes {
		producers.Go(func() {
			lane, tenant := fmt.Sprintf("l%d", l), fmt.Sprintf("t%d", l%7)
			for i := range perLane {
				item := l*perLane + i
				for {
					err := s.Push(lane, tenant, item, 1+item%400)
					if err == nil {
						break
					}
					if !errors.Is(err, ErrLaneFull) {
						t.Errorf("Push: %v", err)
						return
					}
					time.Sleep(100 * time.Microsecond) // backpressure
				}
			}
		})
	}
	producers.Wait()
	delivered.Wait()
	s.Close()
	wg.Wait()
	for l := range lanes {
		if st := stats(t, s, fmt.Sprintf("l%d", l)); st.Queued != 0 || st.InFlight != 0 || st.Cap < 1 || st.Cap > 8 {
			t.Errorf("lane %d at the end: %+v", l, st)
		}
	}
}

// BenchmarkPushNextDone measures one item's round trip through the scheduler
// in steady state: every lane holds a few queued items, and each completed
// item is replaced by a new one on the same lane. With blocked lanes, half of
// the lanes are at their cap forever (black-holed destinations), which must
// not slow the others.
func BenchmarkPushNextDone(b *testing.B) {
	for _, bc := range []struct{ lanes, blocked int }{
		{1, 0}, {100, 0}, {2000, 0}, {2000, 1000},
	} {
		b.Run(fmt.Sprintf("lanes=%d/blocked=%d", bc.lanes, bc.blocked), func(b *testing.B) {
			s, err := New[int](Config{MaxQueued: 64})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			for l := range bc.lanes {
				lane, tenant := fmt.Sprintf("d%d", l), fmt.Sprintf("t%d", l%100)
				for i := range 4 {
					mustPush(b, s, lane, tenant, i, 100)
				}
			}
			ctx := context.Background()
			// Take the blocked lanes' slots and never give them back.
			for held := 0; held < 2*bc.blocked; {
				tk, _ := s.Next(ctx)
				if n := lanes(tk.Lane); n < bc.blocked {
					held++
					continue
				}
				s.Done(tk, Neutral)
				_ = s.Push(tk.Lane, tk.Tenant, tk.Item, tk.Cost)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				tk, err := s.Next(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if lanes(tk.Lane) < bc.blocked {
					b.Fatalf("blocked lane %s dispatched", tk.Lane)
				}
				s.Done(tk, OK)
				if err := s.Push(tk.Lane, tk.Tenant, tk.Item, tk.Cost); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// lanes parses the number of a benchmark lane id "d<n>".
func lanes(id string) int {
	n := 0
	for _, c := range id[1:] {
		n = n*10 + int(c-'0')
	}
	return n
}

// BenchmarkParallel measures contention: GOMAXPROCS workers on 2,000 lanes.
func BenchmarkParallel(b *testing.B) {
	s, err := New[int](Config{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	for l := range 2000 {
		for i := range 4 {
			mustPush(b, s, fmt.Sprintf("d%d", l), fmt.Sprintf("t%d", l%100), i, 100)
		}
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		for pb.Next() {
			tk, err := s.Next(ctx)
			if err != nil {
				b.Error(err)
				return
			}
			s.Done(tk, OK)
			if err := s.Push(tk.Lane, tk.Tenant, tk.Item, tk.Cost); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// clock is a settable time for the scheduler's now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func withClock(s *Scheduler[int]) *clock {
	c := &clock{t: time.Unix(1_700_000_000, 0)}
	s.mu.Lock()
	s.now = c.now
	s.mu.Unlock()
	return c
}

// TestTenantCannotHoldThePool: one tenant's 10 destinations, each with work
// and room in its own cap, may hold only TenantMaxInFlight workers; the
// next worker serves another tenant, and the bound frees as tickets end.
func TestTenantCannotHoldThePool(t *testing.T) {
	s := newScheduler(t, Config{Quantum: 1, MaxCap: 8, InitialCap: 8, TenantMaxInFlight: 4})
	for i := range 10 {
		for j := range 8 {
			mustPush(t, s, fmt.Sprintf("a%d", i), "A", i*10+j, 1)
		}
	}
	var held []Ticket[int]
	for range 4 {
		tk := mustNext(t, s)
		if tk.Tenant != "A" {
			t.Fatalf("picked %s with only A queued", tk.Tenant)
		}
		held = append(held, tk)
	}
	assertBlocked(t, s) // A is at its bound; nobody else has work
	mustPush(t, s, "b", "B", 1000, 1)
	if tk := mustNext(t, s); tk.Tenant != "B" {
		t.Fatalf("picked %s, want B while A holds its bound", tk.Tenant)
	}
	s.Done(held[0], OK)
	if tk := mustNext(t, s); tk.Tenant != "A" {
		t.Fatalf("picked %s after one of A's ended, want A", tk.Tenant)
	}
	assertBlocked(t, s)
}

// TestWorkerTimeIsCharged: two tenants with endless work, one whose
// requests take 1 s and one whose take 10 ms. Charged by impressions alone
// they would be picked equally often; charged by worker time too, the fast
// one is picked many times more, so the slow one holds far fewer workers.
func TestWorkerTimeIsCharged(t *testing.T) {
	s := newScheduler(t, Config{Quantum: 10, MaxCap: 8, InitialCap: 8, TimeQuantum: 100 * time.Millisecond})
	c := withClock(s)
	picks := map[string]int{}
	for i := range 2000 {
		for _, tn := range []string{"slow", "fast"} {
			if st, ok := s.Stats(tn); !ok || st.Queued < 2 {
				mustPush(t, s, tn, tn, i, 10)
			}
		}
		tk := mustNext(t, s)
		picks[tk.Tenant]++
		if tk.Tenant == "slow" {
			c.advance(time.Second)
		} else {
			c.advance(10 * time.Millisecond)
		}
		s.Done(tk, OK)
	}
	if picks["fast"] < 10*picks["slow"] {
		t.Errorf("picks %v: the fast tenant should get at least 10 times the slow one's", picks)
	}
	t.Logf("picks %v", picks)
}

// TestSlowAnswersShrinkTheCap: 2xx answers close to the timeout (Slow)
// halve the cap as failures do; fast ones grow it.
func TestSlowAnswersShrinkTheCap(t *testing.T) {
	s := newScheduler(t, Config{Quantum: 1, MinCap: 1, InitialCap: 8, MaxCap: 8})
	for i := range 4 {
		mustPush(t, s, "l", "t", i, 1)
	}
	for _, want := range []int{4, 2, 1} {
		s.Done(mustNext(t, s), Slow)
		if got := stats(t, s, "l").Cap; got != want {
			t.Fatalf("cap %d after a slow answer, want %d", got, want)
		}
	}
	s.Done(mustNext(t, s), OK)
	if got := stats(t, s, "l").Cap; got != 2 {
		t.Errorf("cap %d after an OK at cap 1, want 2", got)
	}
}

// TestSweepCapsAHangingLane: a destination that answered in 50 ms and then
// holds its 8 requests unanswered is cut to one in flight once they have
// waited 2 s, long before a 10 s timeout; one whose answers usually take
// 1 s is given four times that before it counts as hanging.
func TestSweepCapsAHangingLane(t *testing.T) {
	s := newScheduler(t, Config{Quantum: 1, MinCap: 1, InitialCap: 8, MaxCap: 8, HangAfter: 2 * time.Second, HangFactor: 4})
	c := withClock(s)
	learn := func(lane string, took time.Duration) {
		mustPush(t, s, lane, lane, 0, 1)
		tk := mustNext(t, s)
		c.advance(took)
		s.Done(tk, OK)
	}
	learn("quick", 50*time.Millisecond)
	learn("steady", time.Second)
	for _, lane := range []string{"quick", "steady"} {
		for i := range 8 {
			mustPush(t, s, lane, lane, i, 1)
		}
	}
	for range 16 {
		mustNext(t, s)
	}
	c.advance(1900 * time.Millisecond)
	if hung := s.Sweep(); len(hung) != 0 {
		t.Fatalf("hung %v after 1.9 s", hung)
	}
	c.advance(200 * time.Millisecond)
	if hung := s.Sweep(); !slices.Equal(hung, []string{"quick"}) {
		t.Fatalf("hung %v after 2.1 s, want [quick]", hung)
	}
	if got := stats(t, s, "quick").Cap; got != 1 {
		t.Errorf("quick's cap %d, want 1", got)
	}
	c.advance(2 * time.Second)
	if hung := s.Sweep(); !slices.Equal(hung, []string{"steady"}) {
		t.Fatalf("hung %v after 4.1 s, want [steady]", hung)
	}
}
