package deploy

import (
	"context"
	"fmt"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/stream"
)

func TestDebugPlain(t *testing.T) {
	var routes []*url.URL
	for range 3 {
		routes = append(routes, &url.URL{Scheme: "nats", Host: fmt.Sprintf("127.0.0.1:%d", freePort(t))})
	}
	var urls string
	for i := range 3 {
		o := &server.Options{ServerName: fmt.Sprint("n", i), Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoSigs: true,
			Cluster: server.ClusterOpts{Name: "c", Host: "127.0.0.1", Port: port(t, routes[i].Host)}, Routes: routes}
		s, _ := server.NewServer(o)
		s.Start()
		t.Cleanup(s.Shutdown)
		s.ReadyForConnections(5 * time.Second)
		urls += s.ClientURL() + ","
	}
	nc0, _ := nats.Connect(urls)
	js0, _ := jetstream.New(nc0)
	for {
		if _, err := js0.AccountInfo(context.Background()); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var wg sync.WaitGroup
	for range 4 {
		nc, _ := nats.Connect(urls)
		defer nc.Close()
		js, _ := jetstream.New(nc)
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
			defer cancel()
			l := stream.DefaultLimits()
			l.Replicas = 3
			start := time.Now()
			t.Log(stream.Ensure(ctx, js, l), time.Since(start))
		}()
	}
	wg.Wait()
}
