// OHIF 3 configuration for deploy/compose.yaml: one data source, Orthanc's DICOMweb through the host's
// published port (the browser, not the container, fetches it).
window.config = {
  routerBasename: "/",
  showStudyList: true,
  dataSources: [
    {
      namespace: "@ohif/extension-default.dataSourcesModule.dicomweb",
      sourceName: "orthanc",
      configuration: {
        friendlyName: "Orthanc (results of harmonode)",
        name: "orthanc",
        wadoUriRoot: "http://localhost:8042/wado",
        qidoRoot: "http://localhost:8042/dicom-web",
        wadoRoot: "http://localhost:8042/dicom-web",
        qidoSupportsIncludeField: false,
        imageRendering: "wadors",
        thumbnailRendering: "wadors",
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
      },
    },
  ],
  defaultDataSourceName: "orthanc",
};
