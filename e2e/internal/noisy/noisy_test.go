package noisy

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/scenario"
	"github.com/bulkhead-io/bulkhead/e2e/internal/stack"
	"github.com/bulkhead-io/bulkhead/pkg/admission"
	"github.com/bulkhead-io/bulkhead/pkg/leaktest"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

// TestSmallMatrix keeps a small version of make bench-noisy honest: three
// rows, each against a fresh stack, a few seconds each. It asserts what
// must hold however loaded the machine is: nothing lost, the quiet tenants
// never refused, the noisy tenant refused with the right reason when it
// fills its parked budget. The timing belongs to the benchmark.
func TestSmallMatrix(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	pairs := scenario.KeyPairs(4)
	var keys, tenants []string
	for i := range 4 {
		keys, tenants = append(keys, scenario.APIKey(i)), append(tenants, scenario.TenantID(i))
	}
	shapes := map[string]Shape{}
	for _, s := range Shapes(25000) {
		shapes[s.Name] = s
	}
	small := shapes["hang-refused-503"]
	small.Destinations = 6
	for _, s := range []Shape{shapes["baseline"], small, shapes["paused-until-full"]} {
		t.Run(s.Name, func(t *testing.T) {
			st, _, _ := stack.StartT(t, stack.Options{StoreDir: t.TempDir(), APIKeys: pairs, Log: stack.TestLoggerAt(t, slog.LevelWarn),
				Tune: func(c *stack.Configs) {
					c.Monitor.Engine.Budgets.TenantParked = 20
					c.Monitor.Engine.BacklogInterval = 200 * time.Millisecond
				}})
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			res, err := Run(ctx, Options{
				IngestAddr: st.IngestAddr, AdminAddr: st.AdminAddrs[0], AdminToken: stack.AdminToken,
				Keys: keys, Tenants: tenants, Quiet: 3, QuietBatch: 10, QuietEvery: 100 * time.Millisecond,
				Measure: 5 * time.Second, Drain: 60 * time.Second, Timeout: 2 * time.Second, SlowDelay: 1800 * time.Millisecond,
				Log: slog.New(slog.DiscardHandler),
			}, s)
			if err != nil {
				t.Fatal(err)
			}
			t.Log(res.Line(res.QuietP99))
			if res.QuietAccepted == 0 || res.QuietRefused != 0 {
				t.Errorf("quiet tenants: %d accepted, %d refused", res.QuietAccepted, res.QuietRefused)
			}
			if res.QuietLost != 0 || res.NoisyLost != 0 {
				t.Errorf("lost: quiet %d, noisy %d", res.QuietLost, res.NoisyLost)
			}
			if s.Pause && res.NoisyRefused[admission.ReasonParkedBudget] == 0 {
				t.Errorf("the noisy tenant filled its parked budget and was refused %v, want %s", res.NoisyRefused, admission.ReasonParkedBudget)
			}
			if !s.Idle && res.NoisyAccepted == 0 {
				t.Error("the noisy tenant had nothing accepted")
			}
		})
	}
}
