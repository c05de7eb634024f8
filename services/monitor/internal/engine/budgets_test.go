package engine

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
	"github.com/bulkhead-io/bulkhead/pkg/codec"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/budget"
)

// TestSpentParkedBudgetRefusesItsTenantOnly parks batches for one tenant's
// destination until the tenant's parked budget is spent: the leader stores
// a refusal for that tenant (and none for the other), audits it, reports it
// in the destination's budgets, and lifts it once the parked data is purged.
func TestSpentParkedBudgetRefusesItsTenantOnly(t *testing.T) {
	e, _ := startEnginesWith(t, 1, func(c *Config) {
		c.BacklogInterval = 100 * time.Millisecond
		c.Budgets = budget.Limits{TenantParked: 5}
	})
	e.waitLeader()
	ctx := context.Background()
	e.destination("d1", "https://example.com/1") // tenant t1
	e.destination("d2", "https://example.com/2")
	for i := range 5 {
		b := testkit.Batch(fmt.Sprintf("b%d", i), []string{"d1", "d2"}[i%2], testkit.Impressions("u", 1))
		if err := parked.Park(ctx, e.js, b, parked.Reason{Class: parked.Paused}, 0, b.GetBatchId()); err != nil {
			t.Fatal(err)
		}
	}
	// Another tenant, one batch under the same budget.
	dests, err := e.js.KeyValue(ctx, topology.BucketDestinations)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := codec.Encode(testkit.Destination("o1", testkit.Tenant("t2")))
	if _, err := dests.Put(ctx, "o1", other); err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		b := testkit.Batch(fmt.Sprintf("o%d", i), "o1", testkit.Impressions("u", 1))
		b.TenantId = "t2"
		if err := parked.Park(ctx, e.js, b, parked.Reason{Class: parked.Paused}, 0, b.GetBatchId()); err != nil {
			t.Fatal(err)
		}
	}
	adm, err := e.js.KeyValue(ctx, topology.BucketAdmission)
	if err != nil {
		t.Fatal(err)
	}
	var r eventv1.Refusal
	poll.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		entry, err := adm.Get(ctx, "t1")
		if err != nil {
			return err
		}
		return codec.Decode(entry.Value(), &r)
	})
	if r.GetReason() != admission.ReasonParkedBudget || r.GetBudget().GetResource() != budget.TenantParked ||
		r.GetBudget().GetUsed() != 5 || r.GetBudget().GetLimit() != 5 || r.GetRetryAfterMs() <= 0 {
		t.Errorf("refusal %v", &r)
	}
	keys, err := adm.Keys(ctx)
	if err != nil || len(keys) != 1 {
		t.Errorf("admission keys %v, %v; want only t1", keys, err)
	}
	waitAudit(t, e.js, "imp.audit.admin.t1", "TenantRefused")

	// The destination's health reports the spent budget and the refusal.
	poll.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		budgets, refusal := e.engines[0].Budgets(&adminv1.Destination{Id: "d1", TenantId: "t1"})
		if refusal.GetReason() != admission.ReasonParkedBudget {
			return fmt.Errorf("refusal %v", refusal)
		}
		for _, b := range budgets {
			if b.GetResource() == budget.TenantParked {
				if b.GetUsed() != 5 || b.GetLimit() != 5 || !b.GetExhausted() {
					return fmt.Errorf("tenant budget %v", b)
				}
				return nil
			}
		}
		return fmt.Errorf("no %s in %v", budget.TenantParked, budgets)
	})

	// Purged: back under budget, admitted again.
	for _, d := range []string{"d1", "d2"} {
		if _, err := parked.Purge(ctx, e.js, d, parked.Range{}, false); err != nil {
			t.Fatal(err)
		}
	}
	poll.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		if _, err := adm.Get(ctx, "t1"); !errors.Is(err, jetstream.ErrKeyNotFound) {
			return fmt.Errorf("t1 still refused (%v)", err)
		}
		return nil
	})
	waitAudit(t, e.js, "imp.audit.admin.t1", "TenantAdmitted")
}

// waitAudit waits for an audit record with action on subj.
func waitAudit(t *testing.T, js jetstream.JetStream, subj, action string) {
	t.Helper()
	st, err := js.Stream(context.Background(), topology.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		for seq := uint64(1); ; {
			m, err := st.GetMsg(context.Background(), seq, jetstream.WithGetMsgSubject(subj))
			if err != nil {
				return fmt.Errorf("no %s on %s (%v)", action, subj, err)
			}
			var r eventv1.AuditRecord
			if err := codec.Decode(m.Data, &r); err == nil && r.GetAction() == action && r.GetActor() == "monitor" {
				return nil
			}
			seq = m.Sequence + 1
		}
	})
}
