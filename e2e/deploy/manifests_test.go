package deploy

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/bulkhead-io/bulkhead/pkg/conf"
	"github.com/bulkhead-io/bulkhead/services/deliverer"
	"github.com/bulkhead-io/bulkhead/services/ingest"
	"github.com/bulkhead-io/bulkhead/services/monitor"
	"github.com/bulkhead-io/bulkhead/services/router"
)

const k8sDir = "../../deploy/k8s"

// object is the part of a Kubernetes object these checks read.
type object struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name string `yaml:"name"`
	} `yaml:"metadata"`
	Data map[string]string `yaml:"data"`
	Spec struct {
		Replicas *int `yaml:"replicas"`
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		Template struct {
			Metadata struct {
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"metadata"`
			Spec struct {
				Containers []container `yaml:"containers"`
			} `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type container struct {
	Name  string `yaml:"name"`
	Image string `yaml:"image"`
	Env   []struct {
		Name      string `yaml:"name"`
		Value     string `yaml:"value"`
		ValueFrom *struct {
			SecretKeyRef *struct {
				Name string `yaml:"name"`
				Key  string `yaml:"key"`
			} `yaml:"secretKeyRef"`
		} `yaml:"valueFrom"`
	} `yaml:"env"`
	Ports []containerPort `yaml:"ports"`
}

type containerPort struct {
	Name          string `yaml:"name"`
	ContainerPort int    `yaml:"containerPort"`
}

// loadManifests parses every YAML document under deploy/k8s.
func loadManifests(t *testing.T) (map[string][]object, []string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(k8sDir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s: %v", k8sDir, err)
	}
	byFile := map[string][]object{}
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(raw))
		for {
			var o object
			if err := dec.Decode(&o); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if o.APIVersion == "" || o.Kind == "" || (o.Metadata.Name == "" && o.Kind != "Kustomization") {
				t.Errorf("%s: a document without apiVersion, kind or metadata.name", f)
			}
			byFile[filepath.Base(f)] = append(byFile[filepath.Base(f)], o)
		}
	}
	return byFile, files
}

// TestManifestsMatchTheCode parses every manifest and checks what can drift
// from the code and from nats.conf: the kustomization lists every file, the
// NATS ConfigMap is nats.conf verbatim and the StatefulSet provides every
// variable it reads, and each Deployment sets only variables its service has
// flags for, with values its configuration accepts.
func TestManifestsMatchTheCode(t *testing.T) {
	byFile, files := loadManifests(t)
	var objs []object
	for _, f := range files {
		objs = append(objs, byFile[filepath.Base(f)]...)
	}
	find := func(kind, name string) *object {
		for i := range objs {
			if objs[i].Kind == kind && objs[i].Metadata.Name == name {
				return &objs[i]
			}
		}
		t.Fatalf("no %s %q in %s", kind, name, k8sDir)
		return nil
	}

	// The kustomization lists every other file.
	var kust struct {
		Resources []string `yaml:"resources"`
	}
	raw, err := os.ReadFile(filepath.Join(k8sDir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(raw, &kust); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if b := filepath.Base(f); b != "kustomization.yaml" && !slices.Contains(kust.Resources, b) {
			t.Errorf("kustomization.yaml does not list %s", b)
		}
	}

	// NATS runs nats.conf as it is, with every variable it reads.
	natsConf, err := os.ReadFile(confPath)
	if err != nil {
		t.Fatal(err)
	}
	if got := find("ConfigMap", "nats-config").Data["nats.conf"]; got != string(natsConf) {
		t.Errorf("ConfigMap nats-config differs from %s: copy the file into deploy/k8s/nats.yaml", confPath)
	}
	natsEnv := envOf(find("StatefulSet", "nats").Spec.Template.Spec.Containers[0])
	for _, m := range regexp.MustCompile(`(?m)^[^#\n]*:\s*\$([A-Za-z_][A-Za-z0-9_]*)`).FindAllStringSubmatch(string(natsConf), -1) {
		if _, ok := natsEnv[m[1]]; !ok {
			t.Errorf("nats.conf reads $%s, which the StatefulSet does not set", m[1])
		}
	}
	if r := find("StatefulSet", "nats").Spec.Replicas; r == nil || *r != 3 {
		t.Error("NATS must run 3 replicas")
	}

	flagsOf := map[string]func(*flag.FlagSet){
		"ingest":    func(fs *flag.FlagSet) { ingest.Flags(fs) },
		"router":    func(fs *flag.FlagSet) { router.Flags(fs) },
		"deliverer": func(fs *flag.FlagSet) { deliverer.Flags(fs) },
		"monitor":   func(fs *flag.FlagSet) { monitor.Flags(fs) },
	}
	// Stand-ins for what the Secrets hold.
	secrets := map[string]string{"api-keys": "key-0123456789=t1", "admin-tokens": "ops:0123456789abcdef:operator"}
	for svc, register := range flagsOf {
		t.Run(svc, func(t *testing.T) {
			prefix := "BULKHEAD_" + strings.ToUpper(svc)
			d := find("Deployment", svc)
			find("PodDisruptionBudget", svc)
			if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
				t.Error("want at least 2 replicas")
			}
			c := d.Spec.Template.Spec.Containers[0]
			if c.Image != "ghcr.io/bulkhead-io/bulkhead-"+svc+":latest" {
				t.Errorf("image %q", c.Image)
			}
			fs := flag.NewFlagSet(svc, flag.ContinueOnError)
			register(fs)
			known := map[string]bool{}
			fs.VisitAll(func(f *flag.Flag) { known[conf.EnvName(prefix, f.Name)] = true })
			env := envOf(c)
			for name, v := range env {
				switch {
				case name == "GOMEMLIMIT":
				case !known[name]:
					t.Errorf("%s is not a flag of %s", name, svc)
				case strings.HasPrefix(v, "secret:"):
					key := strings.TrimPrefix(v, "secret:")
					if name == prefix+"_NATS_PASSWORD" {
						if key != "bulkhead-nats-users/"+svc {
							t.Errorf("%s from %s, want bulkhead-nats-users/%s", name, key, svc)
						}
						env[name] = password(svc)
						continue
					}
					_, k, _ := strings.Cut(key, "/")
					env[name] = secrets[k]
				}
			}
			// The monitor owns the streams' configuration; the others have no
			// stream flags (an unknown variable fails the check above).
			if svc == "monitor" && env[prefix+"_STREAM_REPLICAS"] != "3" {
				t.Errorf("%s_STREAM_REPLICAS = %q, want 3", prefix, env[prefix+"_STREAM_REPLICAS"])
			}
			if u := env[prefix+"_NATS_USER"]; u != svc || users[u] == "" {
				t.Errorf("%s_NATS_USER = %q, want %s (a user of nats.conf)", prefix, u, svc)
			}
			host, port, err := net.SplitHostPort(env[prefix+"_METRICS_ADDR"])
			if err != nil || host != "0.0.0.0" {
				t.Errorf("%s_METRICS_ADDR = %q: want 0.0.0.0:<port> so probes and Prometheus reach it", prefix, env[prefix+"_METRICS_ADDR"])
			}
			if a := d.Spec.Template.Metadata.Annotations; a["prometheus.io/scrape"] != "true" || a["prometheus.io/port"] != port {
				t.Errorf("prometheus annotations %v, want port %s", a, port)
			}
			if !slices.Contains(c.Ports, containerPort{Name: "metrics", ContainerPort: atoi(port)}) {
				t.Errorf("no metrics container port %s", port)
			}

			// The service accepts the configuration as deployed.
			for name, v := range env {
				t.Setenv(name, v)
			}
			var perr error
			switch svc {
			case "ingest":
				_, perr = ingest.ParseConfig(nil)
			case "router":
				_, perr = router.ParseConfig(nil)
			case "deliverer":
				_, perr = deliverer.ParseConfig(nil)
			case "monitor":
				_, perr = monitor.ParseConfig(nil)
			}
			if perr != nil {
				t.Errorf("configuration from the manifest: %v", perr)
			}
		})
	}
}

// envOf returns a container's variables; those from a Secret read
// "secret:<name>/<key>".
func envOf(c container) map[string]string {
	out := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil:
			out[e.Name] = "secret:" + e.ValueFrom.SecretKeyRef.Name + "/" + e.ValueFrom.SecretKeyRef.Key
		default:
			out[e.Name] = e.Value
		}
	}
	return out
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}
