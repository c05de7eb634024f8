package route

import (
	"testing"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
)

func imp(split, env string) *ingestv1.Impression {
	return &ingestv1.Impression{Key: "u", Split: split, EnvironmentId: env, Treatment: "on", Time: 1}
}

func TestPlan(t *testing.T) {
	b := &eventv1.Batch{Impressions: []*ingestv1.Impression{imp("a", "prod"), imp("b", "prod"), imp("a", "dev")}}
	dests := []*adminv1.Destination{
		{Id: "all", Enabled: true},
		{Id: "split-a", Enabled: true, Filter: &adminv1.Filter{Splits: []string{"a"}}},
		{Id: "a-prod", Enabled: true, Filter: &adminv1.Filter{Splits: []string{"a"}, EnvironmentIds: []string{"prod"}}},
		{Id: "none", Enabled: true, Filter: &adminv1.Filter{Splits: []string{"zzz"}}},
		{Id: "off", Enabled: false},
		{Id: "quarantined", Enabled: true},
		{Id: "paused", Enabled: true},
		{Id: "recovering", Enabled: true},
	}
	states := map[string]eventv1.State{
		"quarantined": eventv1.State_STATE_QUARANTINED,
		"paused":      eventv1.State_STATE_PAUSED,
		"recovering":  eventv1.State_STATE_RECOVERING,
	}
	got := map[string]Target{}
	for _, tg := range Plan(b, dests, func(id string) eventv1.State { return states[id] }) {
		got[tg.DestinationID] = tg
	}
	want := map[string]struct {
		n    int
		park bool
	}{
		"all": {3, false}, "split-a": {2, false}, "a-prod": {1, false},
		"off": {3, true}, "quarantined": {3, true}, "paused": {3, true}, "recovering": {3, false},
	}
	if len(got) != len(want) {
		t.Errorf("targets = %v, want %d of them", got, len(want))
	}
	for id, w := range want {
		g, ok := got[id]
		if !ok {
			t.Errorf("%s: no target", id)
			continue
		}
		if len(g.Impressions) != w.n || g.Park != w.park {
			t.Errorf("%s: %d impressions park=%v, want %d park=%v", id, len(g.Impressions), g.Park, w.n, w.park)
		}
		if g.Park && !g.Reason.Class.Hold() {
			t.Errorf("%s: parked without a reason", id)
		}
	}
}
