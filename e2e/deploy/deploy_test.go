// Package deploy checks deploy/ against the code it deploys: the NATS
// configuration runs a cluster on which every service works as its own user
// and is refused what it should not do, and the Kubernetes manifests
// configure the services with flags they have.
package deploy

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bulkhead-io/bulkhead/e2e/internal/stack"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/leaktest"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/services/deliverer"
	"github.com/bulkhead-io/bulkhead/services/ingest"
	"github.com/bulkhead-io/bulkhead/services/monitor"
	"github.com/bulkhead-io/bulkhead/services/router"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

// confPath is the one configuration file every NATS node runs.
const confPath = "../../deploy/nats/nats.conf"

// users maps each NATS user of nats.conf to the variable holding its password.
var users = map[string]string{
	"ingest":    "BULKHEAD_INGEST_NATS_PASSWORD",
	"router":    "BULKHEAD_ROUTER_NATS_PASSWORD",
	"deliverer": "BULKHEAD_DELIVERER_NATS_PASSWORD",
	"monitor":   "BULKHEAD_MONITOR_NATS_PASSWORD",
	"ops":       "BULKHEAD_OPS_NATS_PASSWORD",
}

func password(user string) string { return "p" + user + "0secret" }

// violationLog is a server logger that keeps permission violations.
type violationLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *violationLog) keep(format string, v ...any) {
	if s := fmt.Sprintf(format, v...); strings.Contains(s, "Violation") {
		l.mu.Lock()
		l.lines = append(l.lines, s)
		l.mu.Unlock()
	}
}

func (l *violationLog) Noticef(string, ...any)         {}
func (l *violationLog) Debugf(string, ...any)          {}
func (l *violationLog) Tracef(string, ...any)          {}
func (l *violationLog) Warnf(format string, v ...any)  { l.keep(format, v...) }
func (l *violationLog) Errorf(format string, v ...any) { l.keep(format, v...) }
func (l *violationLog) Fatalf(format string, v ...any) { l.keep(format, v...) }
func (l *violationLog) snapshot() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.lines...)
}
func (l *violationLog) String() string { return strings.Join(l.snapshot(), "\n") }
func (l *violationLog) count() int     { return len(l.snapshot()) }

var _ server.Logger = (*violationLog)(nil)

// startCluster starts three nodes from nats.conf as the StatefulSet does (one
// file, SERVER_NAME and the passwords from the environment), changing only
// where they listen and store: loopback, free ports, temporary directories.
// It returns the client URLs once JetStream has a meta leader.
func startCluster(t *testing.T, log *violationLog) string {
	t.Helper()
	for user, env := range users {
		t.Setenv(env, password(user))
	}
	t.Setenv("NATS_SYS_PASSWORD", password("sys"))
	var routes []*url.URL
	for range 3 {
		routes = append(routes, &url.URL{Scheme: "nats", Host: fmt.Sprintf("127.0.0.1:%d", freePort(t))})
	}
	t.Cleanup(func() {
		if t.Failed() && log.count() > 0 {
			t.Logf("permission violations:\n%s", log)
		}
	})
	var urls []string
	for i := range 3 {
		t.Setenv("SERVER_NAME", fmt.Sprintf("nats-%d", i))
		opts, err := server.ProcessConfigFile(confPath)
		if err != nil {
			t.Fatalf("%s: %v", confPath, err)
		}
		if opts.ServerName != fmt.Sprintf("nats-%d", i) || opts.Cluster.Name != "bulkhead" || len(opts.Routes) != 3 || !opts.JetStream {
			t.Fatalf("%s: server %q cluster %q, %d routes, jetstream %v: want nats-%d in bulkhead, 3 routes, jetstream",
				confPath, opts.ServerName, opts.Cluster.Name, len(opts.Routes), opts.JetStream, i)
		}
		opts.Host, opts.Port, opts.HTTPPort = "127.0.0.1", -1, 0
		opts.Cluster.Host, opts.Cluster.Port = "127.0.0.1", port(t, routes[i].Host)
		opts.Routes = routes
		opts.StoreDir, opts.PidFile, opts.NoSigs = t.TempDir(), "", true
		s, err := server.NewServer(opts)
		if err != nil {
			t.Fatalf("nats-%d: %v", i, err)
		}
		s.SetLogger(log, false, false)
		s.Start()
		t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
		if !s.ReadyForConnections(10 * time.Second) {
			t.Fatalf("nats-%d not ready", i)
		}
		urls = append(urls, s.ClientURL())
	}
	all := strings.Join(urls, ",")
	nc := connect(t, all, "ops", nil)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := js.AccountInfo(ctx)
		return err
	})
	return all
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func port(t *testing.T, hostport string) int {
	_, p, _ := net.SplitHostPort(hostport)
	var n int
	if _, err := fmt.Sscan(p, &n); err != nil {
		t.Fatal(err)
	}
	return n
}

// connect connects as user; asyncErr, when set, receives the connection's
// asynchronous errors (permission violations among them).
func connect(t *testing.T, urls, user string, asyncErr chan<- error) *nats.Conn {
	t.Helper()
	opts := []nats.Option{nats.UserInfo(user, password(user))}
	if asyncErr != nil {
		opts = append(opts, nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case asyncErr <- err:
			default:
			}
		}))
	}
	nc, err := nats.Connect(urls, opts...)
	if err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// services runs the four services as their NATS users against urls, with
// R3 streams as in Kubernetes, until the returned stop is called.
type services struct {
	ingestAddr, adminAddr string
	stop                  func()
}

func startServices(t *testing.T, urls string) *services {
	t.Helper()
	log := stack.TestLogger(t)
	base := func(user string) map[string]string {
		return map[string]string{"nats-url": urls, "nats-user": user, "nats-password": password(user),
			"metrics-addr": ""}
	}
	with := func(m map[string]string, kv ...string) map[string]string {
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	ic := parse(t, ingest.Flags, with(base("ingest"), "api-keys", "key-t1=t1"))
	rc := parse(t, router.Flags, base("router"))
	dc := parse(t, deliverer.Flags, with(base("deliverer"), "allow-nets", "127.0.0.0/8", "retry-base", "100ms", "retry-max", "1s"))
	mc := parse(t, monitor.Flags, with(base("monitor"), "stream-replicas", "3", "allow-nets", "127.0.0.0/8",
		"admin-tokens", "admin:"+stack.AdminToken+":operator", "request-timeout", "2s"))
	for _, v := range []interface{ Validate() error }{ic, rc, dc, mc} {
		if err := v.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	ingLis, admLis := listen(t), listen(t)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	run := func(name string, fn func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(ctx); err != nil && ctx.Err() == nil {
				t.Errorf("%s stopped: %v", name, err)
			}
		}()
	}
	run("monitor", func(ctx context.Context) error {
		return monitor.Run(ctx, mc, log.With("service", "monitor"), monitor.Listeners{Admin: admLis})
	})
	run("router", func(ctx context.Context) error { return router.Run(ctx, rc, log.With("service", "router"), nil) })
	run("deliverer", func(ctx context.Context) error { return deliverer.Run(ctx, dc, log.With("service", "deliverer"), nil) })
	run("ingest", func(ctx context.Context) error {
		return ingest.Run(ctx, ic, log.With("service", "ingest"), ingest.Listeners{GRPC: ingLis})
	})
	// All four start at once, as on a first deploy: concurrent stream.Ensure
	// calls on a fresh cluster must not stall each other.
	adm := adminv1.NewAdminServiceClient(dial(t, admLis.Addr().String()))
	poll.CheckFor(t, 90*time.Second, 100*time.Millisecond, func() error {
		_, err := adm.ListDestinations(stack.WithToken(context.Background(), stack.AdminToken), &adminv1.ListDestinationsRequest{})
		return err
	})
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); wg.Wait() }) }
	t.Cleanup(stop)
	return &services{ingestAddr: ingLis.Addr().String(), adminAddr: admLis.Addr().String(), stop: stop}
}

func parse[C any](t *testing.T, flags func(*flag.FlagSet) *C, values map[string]string) *C {
	t.Helper()
	fs := flag.NewFlagSet("deploy", flag.ContinueOnError)
	c := flags(fs)
	for k, v := range values {
		if err := fs.Set(k, v); err != nil {
			t.Fatalf("flag %s=%q: %v", k, v, err)
		}
	}
	return c
}

func listen(t *testing.T) net.Listener {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// TestServicesRunAsLeastPrivilegedUsers runs every service on a cluster
// started from nats.conf, each as its own user, through the paths that use
// NATS differently: start-up (streams, buckets, consumers, watches), routing
// and delivery, a pause that parks and a resume that replays under a lease,
// a 410 that disables a destination, export, purge, deletion and shutdown.
// No step may hit a permission violation. Then each user is refused a
// sample of what belongs to the others.
func TestServicesRunAsLeastPrivilegedUsers(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	violations := &violationLog{}
	urls := startCluster(t, violations)
	svc := startServices(t, urls)
	ing := ingestv1.NewIngestServiceClient(dial(t, svc.ingestAddr))
	adm := adminv1.NewAdminServiceClient(dial(t, svc.adminAddr))
	op := stack.WithToken(context.Background(), stack.AdminToken)
	tenant := stack.WithToken(context.Background(), "key-t1")

	ok, gone := stack.NewReceiver(), stack.NewReceiver()
	t.Cleanup(ok.Close)
	t.Cleanup(gone.Close)
	gone.Status.Store(410)
	for id, r := range map[string]*stack.Receiver{"ok": ok, "gone": gone} {
		resp, err := adm.CreateDestination(op, &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{
			Id: id, TenantId: "t1", Url: r.URL(), Enabled: true, Linger: durationpb.New(20 * time.Millisecond)}})
		if err != nil {
			t.Fatalf("create %s: %v", id, err)
		}
		if err := r.SetSecret(resp.GetDestination().GetSecret()); err != nil {
			t.Fatal(err)
		}
	}
	submit := func(prefix string, n int) {
		t.Helper()
		req := &ingestv1.SubmitRequest{IdempotencyKey: prefix}
		for i := range n {
			req.Impressions = append(req.Impressions, &ingestv1.Impression{Key: fmt.Sprintf("%s-%d", prefix, i), Split: "s", Treatment: "on", Time: 1})
		}
		poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
			_, err := ing.Submit(tenant, req)
			return err
		})
	}
	received := func(r *stack.Receiver, n int) func() error {
		return func() error {
			if got := len(r.Snapshot().Keys); got < n {
				return fmt.Errorf("received %d of %d", got, n)
			}
			return nil
		}
	}
	health := func(id string) *adminv1.DestinationHealth {
		h, err := adm.GetDestinationHealth(op, &adminv1.GetDestinationHealthRequest{Id: id})
		if err != nil {
			t.Fatalf("health %s: %v", id, err)
		}
		return h.GetHealth()
	}

	// Route and deliver; "gone" answers 410, so the deliverer disables it and
	// parks its batch. The monitor sees the outcomes.
	submit("a", 20)
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, received(ok, 20))
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		d, err := adm.GetDestination(op, &adminv1.GetDestinationRequest{Id: "gone"})
		if err != nil {
			return err
		}
		if d.GetDestination().GetEnabled() || health("gone").GetParked() == 0 {
			return errors.New("410 destination not yet disabled with its batch parked")
		}
		return nil
	})
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		if health("ok").GetWindowAttempts() == 0 {
			return errors.New("monitor has seen no outcome")
		}
		return nil
	})

	// Pause: the router parks. Resume: it replays under a lease.
	if _, err := adm.PauseDestination(op, &adminv1.PauseDestinationRequest{Id: "ok", Reason: "deploy test"}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // routers enforce a decision within a second
	submit("b", 10)
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		if health("ok").GetParked() == 0 {
			return errors.New("nothing parked for the paused destination")
		}
		return nil
	})
	if _, err := adm.ResumeDestination(op, &adminv1.ResumeDestinationRequest{Id: "ok", Reason: "deploy test"}); err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, received(ok, 30))

	// Export, purge and delete through the monitor; the deliverer then
	// deletes the destination's consumer.
	export, err := adm.ExportParked(op, &adminv1.ExportParkedRequest{Id: "gone"})
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := export.Recv(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("export: %v", err)
		}
	}
	if p, err := adm.PurgeParked(op, &adminv1.PurgeParkedRequest{Id: "gone", Reason: "deploy test"}); err != nil || p.GetBatches() == 0 {
		t.Fatalf("purge: %v %v", p, err)
	}
	if _, err := adm.DeleteDestination(op, &adminv1.DeleteDestinationRequest{Id: "gone"}); err != nil {
		t.Fatal(err)
	}
	ops := connect(t, urls, "ops", nil)
	js, err := jetstream.New(ops)
	if err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := js.Consumer(ctx, "DELIVERY", "deliver-gone"); !errors.Is(err, jetstream.ErrConsumerNotFound) {
			return fmt.Errorf("consumer deliver-gone still there: %v", err)
		}
		return nil
	})
	// The streams really are replicated three times.
	for _, name := range []string{"IMPRESSIONS", "DELIVERY", "PARKED", "OUTCOMES", "AUDIT", "KV_destinations", "KV_quarantine", "KV_leases", "KV_admission"} {
		s, err := js.Stream(context.Background(), name)
		if err != nil || s.CachedInfo().Config.Replicas != 3 {
			t.Errorf("stream %s: %v, want 3 replicas", name, err)
		}
	}

	svc.stop() // shutdown paths (lease release, watch teardown) count too
	if violations.count() > 0 {
		t.Fatalf("services hit permission violations:\n%s", violations)
	}

	// Each user is refused what belongs to the others.
	refused := map[string][]string{
		"ingest": {"imp.deliver.x", "imp.parked.x", "$KV.destinations.x", "$KV.admission.x", "$JS.API.STREAM.DELETE.IMPRESSIONS",
			"$JS.API.STREAM.UPDATE.PARKED", "$JS.API.STREAM.CREATE.IMPRESSIONS",
			"$JS.API.STREAM.PURGE.IMPRESSIONS", "$JS.API.CONSUMER.CREATE.IMPRESSIONS.router.imp.in.>", "sub:imp.in.>"},
		// The router may publish imp.in.<tenant>: it hands back there the
		// outputs of a batch it could not store.
		"router": {"imp.outcome.x", "imp.audit.x", "$KV.destinations.x", "$KV.quarantine.x", "$KV.admission.x",
			"$JS.API.STREAM.DELETE.PARKED", "$JS.API.STREAM.UPDATE.PARKED", "$JS.API.CONSUMER.CREATE.DELIVERY.deliver-x.imp.deliver.x", "sub:imp.>"},
		"deliverer": {"imp.in.x", "imp.deliver.x", "imp.audit.x", "$KV.quarantine.x", "$KV.leases.x", "$KV.admission.x",
			"$JS.API.STREAM.MSG.DELETE.PARKED", "$JS.API.STREAM.UPDATE.DELIVERY", "$JS.API.CONSUMER.CREATE.DELIVERY.all", "$JS.API.CONSUMER.DELETE.IMPRESSIONS.router"},
		"monitor": {"imp.in.x", "imp.parked.x", "$JS.API.STREAM.DELETE.AUDIT", "$JS.API.STREAM.PURGE.PARKED",
			"$JS.API.CONSUMER.CREATE.IMPRESSIONS.x.imp.in.>", "$JS.API.CONSUMER.MSG.NEXT.DELIVERY.deliver-ok"},
	}
	for user, subjects := range refused {
		errs := make(chan error, 1)
		nc := connect(t, urls, user, errs)
		for _, s := range subjects {
			if sub, ok := strings.CutPrefix(s, "sub:"); ok {
				if _, err := nc.SubscribeSync(sub); err != nil {
					t.Fatal(err)
				}
			} else if err := nc.Publish(s, nil); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-errs:
				if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), strings.TrimPrefix(s, "sub:")) {
					t.Errorf("%s %s: %v, want a permission violation", user, s, err)
				}
			case <-time.After(15 * time.Second):
				t.Errorf("%s may %s", user, s)
			}
		}
	}
	// No anonymous clients, no wrong passwords.
	if nc, err := nats.Connect(urls); err == nil {
		nc.Close()
		t.Error("anonymous connection accepted")
	}
	if nc, err := nats.Connect(urls, nats.UserInfo("ingest", "wrong")); err == nil {
		nc.Close()
		t.Error("wrong password accepted")
	}
}
