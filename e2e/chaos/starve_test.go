// Package chaos breaks Bulkhead's own parts while it carries load, on a
// cluster of real nats-server processes, and checks that nothing accepted is
// lost and that delivery resumes within seconds.
package chaos

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bulkhead-io/bulkhead/e2e/internal/cluster"
	"github.com/bulkhead-io/bulkhead/e2e/internal/stack"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/leaktest"
	"github.com/bulkhead-io/bulkhead/pkg/natstest"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

// resumeWithin bounds how long after a fault has healed every destination
// must receive a batch submitted then. The lanes repair a lost pull in about
// 4 s and the registry watch a broken subscription in about 10 s; the rest
// is headroom for a loaded 2-core box.
const resumeWithin = 45 * time.Second

// TestNoDestinationStopsReceiving carries steady load to a tenant's
// destinations through the public API on a 3-node cluster of real
// nats-server processes while the cluster fails the ways that once left
// destinations starving for good: every delivery consumer's leader steps
// down; the node leading DELIVERY stalls for 10 s (SIGSTOP); the whole
// cluster restarts; destinations are created one after another under load.
// After each fault every destination must receive what is submitted next
// within seconds, and in the end every accepted impression must have
// reached every destination.
func TestNoDestinationStopsReceiving(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster of nats-server processes")
	}
	c := cluster.Start(t, 3)
	_, ing, adm := stack.StartT(t, stack.Options{NATSURL: c.URLs(), Log: stack.TestLoggerAt(t, slog.LevelWarn)})
	nc, err := nats.Connect(c.URLs(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	op := stack.WithToken(context.Background(), stack.AdminToken)

	var mu sync.Mutex // guards receivers, dests and the accounting below
	var receivers []*stack.Receiver
	var dests []string
	addDest := func() {
		t.Helper()
		r := stack.NewReceiver()
		t.Cleanup(r.Close)
		id := fmt.Sprintf("d%d", len(dests))
		poll.CheckFor(t, 60*time.Second, 500*time.Millisecond, func() error {
			ctx, cancel := context.WithTimeout(op, 5*time.Second)
			defer cancel()
			_, err := adm.CreateDestination(ctx, &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{
				Id: id, TenantId: "t1", Url: r.URL(), Enabled: true, Linger: durationpb.New(20 * time.Millisecond),
				Timeout: durationpb.New(2 * time.Second),
			}})
			return err
		})
		mu.Lock()
		receivers = append(receivers, r)
		dests = append(dests, id)
		mu.Unlock()
	}

	// Accepted keys, with the destinations that existed when each was
	// accepted: a destination owes only what was accepted after it.
	owed := map[string]int{} // key -> number of destinations it was accepted for
	var keys []string
	seq := 0
	submit := func(prefix string) (string, error) {
		mu.Lock()
		seq++
		k := fmt.Sprintf("%s-%d", prefix, seq)
		n := len(dests)
		mu.Unlock()
		ctx, cancel := context.WithTimeout(stack.WithToken(context.Background(), "key-t1"), 5*time.Second)
		defer cancel()
		_, err := ing.Submit(ctx, &ingestv1.SubmitRequest{Impressions: []*ingestv1.Impression{{Key: k, Split: "s", Treatment: "on", Time: 1}}})
		if err == nil {
			mu.Lock()
			owed[k] = n
			keys = append(keys, k)
			mu.Unlock()
		}
		return k, err
	}

	// Steady load: a batch every 50 ms; refusals during a fault are
	// expected (Unavailable), and only accepted keys are owed.
	stop := make(chan struct{})
	loadDone := make(chan struct{})
	refused := 0
	startLoad := func() {
		go func() {
			defer close(loadDone)
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if _, err := submit("load"); err != nil {
						refused++
					}
				}
			}
		}()
	}

	// resumes submits a marker once the cluster answers again and waits
	// until every destination has it.
	resumes := func(fault string) {
		t.Helper()
		var marker string
		poll.CheckFor(t, 60*time.Second, 200*time.Millisecond, func() error {
			k, err := submit("marker")
			marker = k
			return err
		})
		start := time.Now()
		poll.CheckFor(t, resumeWithin, 100*time.Millisecond, func() error {
			var missing []string
			for i, r := range receivers {
				if r.Snapshot().Keys[marker] == 0 {
					missing = append(missing, dests[i])
				}
			}
			if len(missing) > 0 {
				return fmt.Errorf("after %s: %v have not received %s; backlog %v", fault, missing, marker, backlog(js, dests))
			}
			return nil
		})
		t.Logf("%s: every destination received within %v", fault, time.Since(start).Round(100*time.Millisecond))
	}

	for range 4 {
		addDest()
	}
	startLoad()
	resumes("start")

	for _, id := range dests {
		name, _ := topology.DeliverConsumer(id)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := natstest.StepDownConsumer(ctx, nc, topology.StreamDelivery, name); err != nil {
			t.Logf("step down %s: %v", name, err)
		}
		cancel()
	}
	resumes("every delivery consumer's leader stepped down")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	leader, err := c.LeaderOf(ctx, js, topology.StreamDelivery, "")
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	c.Stall(leader)
	time.Sleep(10 * time.Second) // the fault itself: a 10 s stall
	c.Resume(leader)
	resumes(fmt.Sprintf("10 s stall of %s, the DELIVERY leader", c.Nodes()[leader].Name))

	c.RestartAll()
	resumes("full cluster restart")

	for i := range 4 {
		addDest()
		resumes(fmt.Sprintf("destination %d of 4 created under load", i+1))
	}

	close(stop)
	<-loadDone

	// Nothing lost: every accepted key reached every destination that
	// existed when it was accepted.
	poll.CheckFor(t, 2*time.Minute, 500*time.Millisecond, func() error {
		mu.Lock()
		defer mu.Unlock()
		for i, r := range receivers {
			got := r.Snapshot().Keys
			var lost []string
			for _, k := range keys {
				if owed[k] > i && got[k] == 0 {
					lost = append(lost, k)
				}
			}
			if len(lost) > 0 {
				sort.Strings(lost)
				return fmt.Errorf("%s is missing %d accepted impressions (first %s)", dests[i], len(lost), lost[0])
			}
		}
		return nil
	})
	t.Logf("accepted %d batches, %d submits refused during faults, lost 0", len(keys), refused)
}

// backlog lists the destinations with batches still in DELIVERY, for
// failure messages.
func backlog(js jetstream.JetStream, dests []string) map[string]uint64 {
	out := map[string]uint64{}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, topology.StreamDelivery)
	if err != nil {
		return out
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(topology.AllDeliver))
	if err != nil {
		return out
	}
	for _, id := range dests {
		subj, _ := topology.Deliver(id)
		if n := info.State.Subjects[subj]; n > 0 {
			out[id] = n
		}
	}
	return out
}
